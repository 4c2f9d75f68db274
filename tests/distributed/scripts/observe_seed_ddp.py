"""The user's distributed multistage seed, unchanged, with one observing callback added.

Each rank writes a digest of its weights at every stage start (after CheckpointCallback has
loaded) and at the end, so tests can check that all ranks agree and that stage 2 starts from
stage 1's best checkpoint.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "seeds" / "scripts"))

import seed_multistage_ddp as seed  # noqa: E402

from ddprun import dl  # noqa: E402


class WeightObserver(dl.Callback):
    def __init__(self, out: Path):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.out = out

    def _write(self, runner, tag):
        model = runner.engine.unwrap(runner.model)
        state = {k: v.tolist() for k, v in model.state_dict().items()}
        rank = max(runner.engine.rank, 0)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{rank}_{tag}.json").write_text(json.dumps(state))

    def on_stage_start(self, runner):
        self._write(runner, f"{runner.stage_key}_start")

    def on_experiment_end(self, runner):
        self._write(runner, "end")


class ObservedRunner(seed.CustomRunner):
    def get_callbacks(self, stage):
        callbacks = super().get_callbacks(stage)
        callbacks["observer"] = WeightObserver(Path("observed"))
        return callbacks


if __name__ == "__main__":
    ObservedRunner("./logs").run()
