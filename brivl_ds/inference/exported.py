"""An exported BriVL: the folder `python -m brivl_ds.export` writes, and the model it loads back.

The folder (read by `load_model`, with no DeepSpeed engine and no process group):
  config.json        the run's model config (`Config.model`) and the vocabulary size
  preprocess.json    what inputs must look like: image size, box layout (max boxes, grid fallback), text length
  model.safetensors  the online towers' weights; momentum copies, queues and optimizer state are left out
  tokenizer/         the Hugging Face tokenizer the run used
  export.json        where it came from: checkpoint, tag, dtype, the run's last evaluation if any, and the trained
                     temperature `tau` (the service's match probabilities are softmax(scores / tau))
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from brivl_ds.config import Config, ModelConfig
from brivl_ds.models.brivl import BriVL

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def save_exported(towers: BriVL, tokenizer, cfg: Config, out: Path, dtype: str = "fp32",
                  provenance: dict | None = None) -> Path:
    """Write the folder `load_model` reads from built towers (`export` does this for a checkpoint)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: t.detach().to(DTYPES[dtype]).contiguous() for name, t in towers.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt", "dtype": dtype})
    tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "config.json").write_text(json.dumps({"model": dataclasses.asdict(cfg.model),
                                                 "vocab_size": len(tokenizer)}, indent=1, ensure_ascii=False))
    (out / "preprocess.json").write_text(json.dumps(dataclasses.asdict(Preprocess.of(cfg)), indent=1))
    # the temperature the towers were trained with (the initial one for towers that were not trained)
    (out / "export.json").write_text(json.dumps({"tau": cfg.moco.tau_init, **(provenance or {}), "dtype": dtype},
                                                indent=1))
    return out


@dataclass
class Preprocess:
    """Inputs as the towers were trained on them (the evaluation transform: whole image resized, no augmentation)."""
    image_size: int
    max_boxes: int
    grid_boxes: int
    max_text_length: int

    @classmethod
    def of(cls, cfg: Config) -> "Preprocess":
        return cls(cfg.model.image.image_size, cfg.model.image.max_boxes, cfg.data.grid_boxes,
                   cfg.model.text.max_length)


@dataclass
class ExportedModel:
    towers: BriVL
    tokenizer: object
    preprocess: Preprocess
    config: ModelConfig
    tau: float = 0.07  # the trained temperature: match probabilities are softmax(scores / tau)

    @property
    def device(self) -> torch.device:
        return next(self.towers.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.towers.parameters()).dtype

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings [N, D] (fp32)."""
        tokens = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.preprocess.max_text_length,
                                return_tensors="pt")
        return self.towers.text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)).float()

    def prepare_image(self, data: bytes, boxes: list | None = None) -> tuple[torch.Tensor, ...]:
        """One encoded image (JPEG, PNG...) as the towers take it: pixels, boxes (x1, y1, x2, y2 in the image's
        pixels; None = the configured fallback layout) and box mask. Raises on an undecodable image."""
        from brivl_ds.config import AugmentConfig
        from brivl_ds.data.transforms import PairTransform

        p = self.preprocess
        transform = PairTransform(AugmentConfig(), p.image_size, p.max_boxes, p.grid_boxes, train=False)
        return transform(data, boxes or [], seed=0)

    @torch.no_grad()
    def embed_prepared(self, prepared: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Unit-norm image embeddings [N, D] (fp32) of `prepare_image` outputs."""
        from brivl_ds.models.brivl import normalize_images

        pixels, box, mask = (torch.stack([s[k] for s in prepared]).to(self.device) for k in range(3))
        return self.towers.image(normalize_images(pixels, self.dtype), box, mask).float()

    def embed_images(self, images: list[bytes], boxes: list | None = None) -> torch.Tensor:
        """Unit-norm image embeddings [N, D] (fp32) of encoded images, with their detector boxes or, without,
        the configured fallback layout."""
        return self.embed_prepared([self.prepare_image(data, boxes[i] if boxes else None)
                                    for i, data in enumerate(images)])


def _model_config(saved: dict) -> ModelConfig:
    return Config.from_dict({"model": saved}).model


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> ExportedModel:
    """The exported towers in eval mode (weights in the exported dtype unless `dtype` is given), the tokenizer and
    the preprocessing settings."""
    from safetensors.torch import load_file

    from brivl_ds.data.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    saved = json.loads((model_dir / "config.json").read_text())
    config = _model_config(saved["model"])
    config.image.pretrained_path = config.text.pretrained_path = None  # the weights below are the trained ones
    towers = BriVL(config, vocab_size=saved["vocab_size"])
    state = load_file(str(model_dir / "model.safetensors"))
    towers.load_state_dict(state, strict=True)
    exported_dtype = next(iter(state.values())).dtype
    towers.to(device=device, dtype=dtype or exported_dtype).eval()
    provenance = json.loads((model_dir / "export.json").read_text())
    return ExportedModel(towers, load_tokenizer(str(model_dir / "tokenizer")),
                         Preprocess(**json.loads((model_dir / "preprocess.json").read_text())), config,
                         tau=provenance.get("tau", ExportedModel.tau))
