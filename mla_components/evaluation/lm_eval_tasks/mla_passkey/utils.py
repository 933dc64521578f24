"""The ``mla_passkey`` lm-eval task class: its documents are generated locally, never downloaded."""

from typing import Any

from lm_eval.api.task import ConfigurableTask


class MLAPasskeyTask(ConfigurableTask):
    """A YAML-configured task whose ``test`` split is built by
    :func:`mla_components.evaluation.passkey.lm_eval_documents` from ``dataset_kwargs``."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"})

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        import datasets

        from mla_components.evaluation.passkey import lm_eval_documents

        docs = lm_eval_documents(**(dataset_kwargs or {}))
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
