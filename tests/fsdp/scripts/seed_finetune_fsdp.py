"""The seeds' distributed finetuning script (tests/seeds/scripts/seed_multistage_ddp.py) with
``dl.FSDPEngine()`` in place of the DDP engine, and one observing callback.

Rank 0 writes ``observed/<tag>.json`` (the model's full state dict as lists) at every stage
start, after CheckpointCallback has loaded, and at the experiment's end; every rank takes part
in gathering it (``engine.full_state_dict`` is a collective).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "seeds" / "scripts"))

import seed_multistage_ddp as seed  # noqa: E402

from ddprun import dl  # noqa: E402


class FullWeights(dl.Callback):
    def __init__(self, out: Path):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.out = out

    def _write(self, runner, tag):
        state = runner.engine.full_state_dict(runner.model)
        if runner.engine.is_master:
            self.out.mkdir(parents=True, exist_ok=True)
            lists = {k: v.tolist() for k, v in state.items()}
            (self.out / f"{tag}.json").write_text(json.dumps(lists))

    def on_stage_start(self, runner):
        self._write(runner, f"{runner.stage_key}_start")

    def on_experiment_end(self, runner):
        self._write(runner, "end")


class FSDPSeedRunner(seed.CustomRunner):
    def get_engine(self):
        return dl.FSDPEngine()

    def get_callbacks(self, stage):
        callbacks = super().get_callbacks(stage)
        callbacks["observer"] = FullWeights(Path("observed"))
        return callbacks


if __name__ == "__main__":
    FSDPSeedRunner("./logs").run()
