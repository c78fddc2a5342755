"""Two-process gloo checks of the distributed pieces against the single-process result."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alice3d.core import dist as cdist
from alice3d.core.losses import DINOLoss, info_nce

WORLD = 2
N = 3  # rows per rank
D = 4


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(WORLD * N, D, generator=g, dtype=torch.float64),
        "w": torch.randn(WORLD * N, D, generator=g, dtype=torch.float64),
        "q": torch.randn(WORLD * N, D, generator=g, dtype=torch.float64),
        "k": torch.randn(WORLD * N, D, generator=g, dtype=torch.float64),
        "t": torch.randn(WORLD * N, 5, generator=g),
        "s": torch.randn(WORLD * N, 5, generator=g),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = _inputs()
        sl = slice(rank * N, (rank + 1) * N)
        out = {"rank": torch.tensor(cdist.rank()), "world": torch.tensor(cdist.world_size())}

        x = data["x"][sl].clone().requires_grad_(True)
        gathered = cdist.all_gather_with_grad(x)
        (gathered * data["w"]).sum().backward()
        out["gathered"], out["x_grad"] = gathered.detach(), x.grad

        q = data["q"][sl].clone().requires_grad_(True)
        k = data["k"][sl].clone().requires_grad_(True)
        loss = info_nce(q, k, temperature=0.3, gather=True)
        loss.backward()
        out["nce"], out["q_grad"], out["k_grad"] = loss.detach(), q.grad, k.grad

        dino = DINOLoss(5, center_momentum=0.8)
        out["dino"] = dino(data["s"][sl], data["t"][sl]).detach()
        out["center"] = dino.center.clone()
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # leave together: a gloo rank torn down while its peer still talks can abort it
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    data = _inputs()
    assert [int(r["rank"]) for r in res] == [0, 1] and all(int(r["world"]) == WORLD for r in res)

    for r in range(WORLD):
        sl = slice(r * N, (r + 1) * N)
        # all_gather_with_grad: rank order; each rank's slice gets the sum of all ranks' gradients
        torch.testing.assert_close(res[r]["gathered"], data["x"])
        torch.testing.assert_close(res[r]["x_grad"], WORLD * data["w"][sl])

    # info_nce with gather: mean of rank losses == loss on the concatenated batch, and per-rank
    # gradients are WORLD x the single-process ones (DDP's averaging divides by WORLD).
    q = data["q"].clone().requires_grad_(True)
    k = data["k"].clone().requires_grad_(True)
    single = info_nce(q, k, temperature=0.3)
    single.backward()
    torch.testing.assert_close(sum(r["nce"] for r in res) / WORLD, single.detach())
    torch.testing.assert_close(torch.cat([r["q_grad"] for r in res]), WORLD * q.grad)
    torch.testing.assert_close(torch.cat([r["k_grad"] for r in res]), WORLD * k.grad)

    # DINO: centre is all-reduced over ranks, so it equals the single-process centre.
    dino = DINOLoss(5, center_momentum=0.8)
    single_dino = dino(data["s"], data["t"])
    for r in res:
        torch.testing.assert_close(r["center"], dino.center)
        torch.testing.assert_close(r["center"], 0.2 * data["t"].mean(0, keepdim=True))
    torch.testing.assert_close(sum(r["dino"] for r in res) / WORLD, single_dino)


def test_single_process_helpers_are_identities():
    assert not cdist.is_dist() and cdist.rank() == 0 and cdist.world_size() == 1
    x = torch.randn(3, 2)
    assert cdist.all_gather_with_grad(x) is x
    assert torch.equal(cdist.all_reduce_sum(x.clone()), x)
