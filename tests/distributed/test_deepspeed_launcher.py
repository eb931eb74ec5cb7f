"""launch/deepspeed.sh (the DeepSpeed launcher used for hostfile clusters) with 2 gloo workers
on this machine: it trains to exactly the weights torchrun's 2 workers reach."""

from __future__ import annotations

import torch

from distributed_helpers import REPO, final_weights, free_port, process_env, run_logged


def test_deepspeed_launcher_matches_torchrun(new_run, reference_run, tmp_path):
    out, overrides = new_run("deepspeed")
    # No hostfile: the launcher's local path. (With one, it first checks every host over
    # ssh, which a test machine need not run.)
    log = tmp_path / "deepspeed.log"
    run_logged([str(REPO / "launch" / "deepspeed.sh"), *overrides], log, 600,
               process_env(NUM_GPUS="2", MASTER_PORT=str(free_port())))
    text = log.read_text()
    assert "--num_gpus 2" in text and text.count("pretraining done: 8 steps") == 2
    expected, got = final_weights(reference_run), final_weights(out)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
