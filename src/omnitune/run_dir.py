"""The run directory: everything eval / infer / export need, and nothing they must look up elsewhere.

    RUN/recipe.yaml            the resolved recipe the run trained with
    RUN/adapter/               PEFT LoRA adapter (method lora), or
    RUN/model/                 the fine-tuned Thinker, save_pretrained (method full)
    RUN/processor/             processor + tokenizer + our chat template
    RUN/speakers.json          voice runs: every voice the Talker speaks as (name -> codec-embedding row), new ones too
    RUN/talker_adapter/        talker.preserve_speech: the Talker LoRA that keeps the voice with the tuned Thinker
    RUN/checkpoints/checkpoint-N/   trainer state for --resume (written atomically)
    RUN/metrics.jsonl          one JSON object per logged step: step, epoch, loss, lr, eval_loss, ...
    RUN/logs/                  tensorboard events
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from omnitune.recipe import Recipe, validate_recipe


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def recipe_file(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def processor(self) -> Path:
        return self.root / "processor"

    @property
    def speakers(self) -> Path:
        return self.root / "speakers.json"

    @property
    def talker_adapter(self) -> Path:
        return self.root / "talker_adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def recipe(self) -> Recipe:
        if not self.recipe_file.exists():
            raise FileNotFoundError(f"{self.root} is not an omnitune run directory (no recipe.yaml)")
        raw = yaml.safe_load(self.recipe_file.read_text())
        raw["base_dir"] = str(self.root)
        return validate_recipe(raw, origin=str(self.recipe_file))

    def weights(self) -> tuple[str, Path]:
        """('adapter', dir) or ('model', dir): what training produced."""
        if (self.adapter / "adapter_config.json").exists():
            return "adapter", self.adapter
        if (self.model / "config.json").exists():
            return "model", self.model
        raise FileNotFoundError(f"{self.root} holds no trained weights (no adapter/ nor model/): did training finish?")

    def save_recipe(self, recipe: Recipe) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.recipe_file.write_text(yaml.safe_dump(recipe.dump(), sort_keys=False))
