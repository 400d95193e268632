"""parallel=fsdp really shards: a real torchrun launch of 2 CPU processes (gloo) builds the model as
trainer.run.build_wrapped_model does, and each rank holds its dim-0 chunk of every parameter
(about half the model); under parallel=ddp each rank holds all of it."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

from conftest import CONF, ROOT, TINY

SCRIPT = textwrap.dedent("""
    import json, sys
    root, conf, out_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    sys.path.insert(0, root)  # this checkout's trainer, not whatever else is installed
    import torch
    from hydra import compose, initialize_config_dir
    from trainer.config.schema import register_configs
    from trainer.distributed import init_distributed, teardown
    from trainer.run import build_wrapped_model

    torch.set_num_threads(1)
    register_configs()
    d = init_distributed("cpu", 120)
    report = {"rank": d.rank, "world_size": d.world_size}
    for kind in ("fsdp", "ddp"):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*overrides, f"parallel={kind}"])
        torch.manual_seed(cfg.seed)
        model, n_params = build_wrapped_model(cfg, torch.device("cpu"), d)
        params = {}
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            params[name.removeprefix("module.")] = {"shape": list(p.shape), "local": local.numel(),
                                                    "dtensor": hasattr(p, "to_local")}
        # FSDP2 units: each block is its own unit, gathered just in time (not the model at once).
        units = [name for name, m in model.named_modules() if type(m).__name__.startswith("FSDP")]
        report[kind] = {"num_params": n_params, "params": params, "units": units}
    with open(f"{out_dir}/rank{d.rank}.json", "w") as f:
        json.dump(report, f)
    teardown(d)
""")


def _chunk_rows(rows: int, rank: int, world: int) -> int:
    """Rows of dim 0 that rank `rank` holds under torch.chunk-style sharding (FSDP2's Shard(0))."""
    per = math.ceil(rows / world)
    return max(0, min(rows, (rank + 1) * per) - rank * per)


def test_fsdp_ranks_hold_half_the_parameters_ddp_all(tmp_path):
    script = tmp_path / "report_shards.py"
    script.write_text(SCRIPT)
    overrides = [*TINY, "model.num_layers=3", "model.d_ff=72"]  # 72 x 32 and 32 x 72: uneven row counts too
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(ROOT), CONF, str(tmp_path), json.dumps(overrides)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    n_params = ranks[0]["fsdp"]["num_params"]
    params = ranks[0]["fsdp"]["params"]
    assert sum(math.prod(p["shape"]) for p in params.values()) == n_params  # global shapes, tied once
    slack = sum(math.prod(p["shape"][1:]) for p in params.values())  # one row per parameter
    totals = []
    for rank, report in enumerate(ranks):
        for name, p in report["fsdp"]["params"].items():
            assert p["dtensor"], f"{name} is not sharded"
            row = math.prod(p["shape"][1:])
            assert p["local"] == _chunk_rows(p["shape"][0], rank, 2) * row, (rank, name, p)
        totals.append(sum(p["local"] for p in report["fsdp"]["params"].values()))
        assert abs(totals[-1] - n_params / 2) <= slack, (rank, totals[-1], n_params)
    assert sum(totals) == n_params
    assert ranks[0]["fsdp"]["units"] == ["", *[f"decoder.blocks.{i}" for i in range(3)]]
    assert totals[0] < 0.6 * n_params and totals[1] < 0.6 * n_params

    for report in ranks:  # DDP replicates: every rank holds every parameter, whole
        ddp = report["ddp"]["params"]
        assert report["ddp"]["num_params"] == n_params
        assert not any(p["dtensor"] for p in ddp.values()) and report["ddp"]["units"] == []
        assert sum(p["local"] for p in ddp.values()) == n_params
