"""Full-parameter knowledge distillation on one device: heal a converted (MLA) student toward its origin teacher.

    tune run mla_recipes/distill_full.py --config configs/smollm2_135m/heal_mla_256.yaml

Torchtune's ``knowledge_distillation_single_device`` trains LoRA adapters only; healing a conversion has to move
every attention weight (the latent projections, their norm), so this recipe trains all parameters (or those
matching ``trainable`` patterns) with the same pieces: ``config.instantiate`` for the models, checkpointers,
dataset, optimizer and losses, Torchtune's ``ForwardKLLoss``, its LR schedulers and metric loggers.

Loss per step: ``kd_ratio * H(teacher, student) + (1 - kd_ratio) * CE(labels)`` over every supervised token,
with ``H`` Torchtune's ``ForwardKLLoss`` (the soft cross-entropy); ``kl`` in the logs subtracts the teacher's
entropy, so it is the divergence itself, the number healing drives toward 0.
Checkpoints: the student's checkpointer (``AtomicHFCheckpointer``) writes ``output_dir/epoch_N`` after each epoch,
with the optimizer, LR schedule and data position for ``resume_from_checkpoint=True``.
"""

import fnmatch
import sys
import time
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import ConcatDataset, DataLoader
from torchtune import config, training, utils
from torchtune.data import padded_collate_sft

log = utils.get_logger("INFO")


def _load_model(
    cfg_model: DictConfig, cfg_checkpointer: DictConfig, device: torch.device, dtype: torch.dtype, **checkpointer_args
):
    checkpointer = config.instantiate(cfg_checkpointer, **checkpointer_args)
    state = checkpointer.load_checkpoint()
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg_model)
    model.load_state_dict(state[training.MODEL_KEY], strict=True)
    return model, checkpointer, state


class FullKDRecipe:
    """Single-device full-parameter distillation (CPU for tests, one GPU for real runs)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.device = utils.get_device(cfg.get("device", "cpu"))
        self.dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=self.device)
        self.kd_ratio = float(cfg.get("kd_ratio", 1.0))
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {self.kd_ratio}")
        self.grad_accum = int(cfg.get("gradient_accumulation_steps", 1))
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch")
        self.epochs_run = 0
        self.global_step = 0

    def setup(self) -> None:
        cfg = self.cfg
        training.set_seed(cfg.get("seed", 0))
        self.student, self.checkpointer, state = _load_model(
            cfg.model,
            cfg.checkpointer,
            self.device,
            self.dtype,
            should_load_recipe_state=bool(cfg.get("resume_from_checkpoint", False)),
        )
        self.teacher, _, _ = _load_model(cfg.teacher_model, cfg.teacher_checkpointer, self.device, self.dtype)
        self.teacher.eval().requires_grad_(False)
        patterns = list(cfg.get("trainable") or ["*"])
        for name, param in self.student.named_parameters():
            param.requires_grad_(any(fnmatch.fnmatch(name, p) for p in patterns))
        params = [p for p in self.student.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"trainable: {patterns} matches no parameter of the student model")
        log.info("training %s of %s student parameters", sum(p.numel() for p in params),
                 sum(p.numel() for p in self.student.parameters()))  # fmt: skip
        self.optimizer = config.instantiate(cfg.optimizer, params)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        # one dataset, a list, or named entries (``dataset.corpus.seq_len=...`` overrides on the command line)
        if isinstance(cfg.dataset, ListConfig):
            datasets = list(cfg.dataset)
        else:
            datasets = [cfg.dataset] if "_component_" in cfg.dataset else list(cfg.dataset.values())
        dataset = ConcatDataset([config.instantiate(d, self.tokenizer) for d in datasets])
        self.sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed))
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=int(cfg.get("num_workers", 0)),
            collate_fn=partial(padded_collate_sft, padding_idx=self.tokenizer.pad_id, ignore_idx=-100),
        )
        steps_per_epoch = len(self.loader) // self.grad_accum
        if self.max_steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, self.max_steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.lr_scheduler = config.instantiate(
            cfg.lr_scheduler, self.optimizer, num_training_steps=cfg.epochs * steps_per_epoch
        )
        self.kd_loss = config.instantiate(cfg.get("kd_loss") or {"_component_": "torchtune.modules.loss.ForwardKLLoss"})
        self.metric_logger = config.instantiate(cfg.metric_logger)
        if training.OPT_KEY in state:  # resume: weights came from the newest epoch directory
            self.optimizer.load_state_dict(state[training.OPT_KEY])
            self.epochs_run = state[training.EPOCHS_KEY]
            self.global_step = self.epochs_run * steps_per_epoch
            self.lr_scheduler.last_epoch = self.global_step - 1
            self.lr_scheduler.step()
        if cfg.get("compile", False):
            self.student = torch.compile(self.student)
            self.teacher = torch.compile(self.teacher)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        tokens = batch["tokens"].to(self.device)
        labels = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)
        labels = labels.to(self.device)
        with torch.no_grad():
            teacher_logits = self.teacher(tokens)
        logits = self.student(tokens)
        mask = labels != -100
        supervised = int(mask.sum())
        soft_ce = self.kd_loss(logits, teacher_logits, labels)  # -sum p_teacher log p_student, per token
        with torch.no_grad():  # minus the teacher's entropy: the KL itself, which healing drives to 0
            log_p = torch.log_softmax(teacher_logits.float(), -1)
            entropy = -(log_p.exp() * log_p).sum(-1)[mask].mean()
        loss = self.kd_ratio * soft_ce
        if self.kd_ratio < 1.0:
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            loss = loss + (1.0 - self.kd_ratio) * ce
        return loss, soft_ce.detach() - entropy, supervised

    def train(self) -> None:
        cfg = self.cfg
        clip = cfg.get("clip_grad_norm")
        self.student.train()
        for epoch in range(self.epochs_run, cfg.epochs):
            self.sampler.generator.manual_seed(cfg.seed + epoch)  # data order depends on the epoch only
            started, tokens_seen, step_in_epoch = time.perf_counter(), 0, 0
            self.optimizer.zero_grad(set_to_none=True)
            for index, batch in enumerate(self.loader):
                loss, kl, supervised = self._loss(batch)
                (loss / self.grad_accum).backward()
                tokens_seen += supervised
                if (index + 1) % self.grad_accum:
                    continue
                grad_norm = None
                if clip is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm=float(clip))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.lr_scheduler.step()
                self.global_step += 1
                step_in_epoch += 1
                if self.global_step % cfg.get("log_every_n_steps", 1) == 0:
                    elapsed = time.perf_counter() - started
                    metrics = {
                        "loss": loss.item(),
                        "kl": kl.item(),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "tokens_per_second": tokens_seen / max(elapsed, 1e-9),
                        "tokens_seen_epoch": tokens_seen,
                    }
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    self.metric_logger.log_dict(metrics, step=self.global_step)
                if step_in_epoch >= self.steps_per_epoch:
                    break
            self.epochs_run = epoch + 1
            self.save_checkpoint(epoch)

    def save_checkpoint(self, epoch: int) -> None:
        model = getattr(self.student, "_orig_mod", self.student)
        state: dict[str, Any] = {training.MODEL_KEY: {k: v.detach().cpu() for k, v in model.state_dict().items()}}
        intermediate = self.epochs_run < self.cfg.epochs
        if intermediate:
            state.update(
                {
                    training.OPT_KEY: self.optimizer.state_dict(),
                    training.EPOCHS_KEY: self.epochs_run,
                    training.SEED_KEY: self.cfg.seed,
                    training.TOTAL_EPOCHS_KEY: self.cfg.epochs,
                    training.MAX_STEPS_KEY: self.max_steps_per_epoch,
                }
            )
        self.checkpointer.save_checkpoint(state, epoch=epoch, intermediate_checkpoint=intermediate)

    def cleanup(self) -> None:
        self.metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point for the recipe."""
    config.log_config(recipe_name="FullKDRecipe", cfg=cfg)
    recipe = FullKDRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
