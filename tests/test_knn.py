import torch
import torch.nn.functional as F

from sslhub.eval.knn import weighted_knn


def knn_loop(bank, labels, q, k, t, c):
    out = torch.zeros(q.shape[0], c)
    for i in range(q.shape[0]):
        sims = [(float(q[i] @ bank[j]), int(labels[j])) for j in range(bank.shape[0])]
        sims.sort(key=lambda s: -s[0])
        for s, lab in sims[:k]:
            out[i, lab] += torch.exp(torch.tensor(s / t))
    return out


def test_weighted_knn_matches_loop():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    q = F.normalize(torch.randn(9, 8, generator=g), dim=1)
    got = weighted_knn(bank, labels, q, k=7, temperature=0.07, num_classes=4, chunk=4)
    assert torch.allclose(got, knn_loop(bank, labels, q, 7, 0.07, 4), rtol=1e-4)


def test_knn_separable_clusters_are_perfect():
    centers = F.normalize(torch.eye(3, 16), dim=1)
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(centers.repeat_interleave(20, 0) + 0.05 * torch.randn(60, 16, generator=g), dim=1)
    labels = torch.arange(3).repeat_interleave(20)
    q = F.normalize(centers + 0.05 * torch.randn(3, 16, generator=g), dim=1)
    assert weighted_knn(bank, labels, q, k=20).argmax(1).tolist() == [0, 1, 2]
