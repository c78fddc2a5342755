"""Alice on two gloo processes equals Alice on one process with the same global batch."""

import dataclasses
import json
import os

import torch

from alice3d.config import TrainConfig
from alice3d.core.dist import cleanup_distributed
from alice3d.methods.alice import Alice, AliceConfig
from alice3d.train.trainer import Trainer

STEPS, GLOBAL_BATCH = 3, 4
SIZE = (32, 32, 16)


def tiny_alice():
    torch.manual_seed(0)
    return Alice(AliceConfig(
        encoder="vit_tiny", encoder_kwargs=dict(hidden_size=48, mlp_dim=96, num_heads=4, num_layers=2),
        img_size=SIZE, patch_size=8, spatial_dims=3, decoder_dim=24, decoder_depth=1, decoder_heads=2,
        head_out_dim=32, head_hidden_dim=32, head_bottleneck_dim=16,
    ))


@dataclasses.dataclass
class Cfg:
    train: TrainConfig


def make_cfg(batch_size):
    return Cfg(TrainConfig(max_steps=STEPS, batch_size=batch_size, lr=1e-3, warmup_steps=0, ckpt_every=0,
                           grad_clip=0.0, device="cpu", log_every=1))


class PairData(torch.utils.data.Dataset):
    """Pair i is a fixed function of i (crops and view seed), like landmark.pairs.PairDataset."""

    def __len__(self):
        return 10**9

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        return {"q": torch.rand(1, *SIZE, generator=g), "k": torch.rand(1, *SIZE, generator=g),
                "view_seed": torch.tensor(7 * i + 3)}


def run_alice(run_dir, batch_size):
    model = tiny_alice()
    cfg = make_cfg(batch_size)
    Trainer(model, cfg.train, run_dir, full_config=cfg).fit(PairData())
    return model



def _worker(rank, world, port, run_dir, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = run_alice(run_dir, GLOBAL_BATCH // world)
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    cleanup_distributed()  # all ranks leave together; see its docstring


def logged(run_dir, key):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path, free_port):
    torch.set_num_threads(1)
    single = run_alice(tmp_path / "single", GLOBAL_BATCH)
    out = tmp_path / "ddp_state.pt"
    torch.multiprocessing.spawn(_worker, args=(2, free_port, tmp_path / "ddp", out), nprocs=2)
    ddp_state = torch.load(out, weights_only=True)

    # Every logged term (reconstruction, inter-volume InfoNCE over the gathered batch, intra/CASA)
    # averaged over ranks equals the single-process value, at every step.
    for key in ("loss", "loss_rec", "loss_inter", "loss_intra"):
        a, b = logged(tmp_path / "single", key), logged(tmp_path / "ddp", key)
        assert len(a) == len(b) == STEPS
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    # The online encoder after three updates and the EMA target that follows it agree too.
    for name, value in single.state_dict().items():
        if name.startswith(("online.", "target.", "encoder.")):
            torch.testing.assert_close(ddp_state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert logged(tmp_path / "single", "loss")[0] != logged(tmp_path / "single", "loss")[-1]  # it trained
