"""`leantune upload`: push an adapter (PEFT format) or a merged model to a Hugging Face Hub repo with a model card."""

from __future__ import annotations

from pathlib import Path

from leantune.commands.flags import check_folder
from leantune.upload import push


def upload(
    folder: Path,
    repo_id: str | None = None,
    checkpoint_dir: Path | None = None,
    run_dir: Path | None = None,
    base_model: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
) -> str:
    """Push an adapter or a model to a Hugging Face Hub repo with a generated model card.

    The card (README.md) names the base model, the method and its hyperparameters, the data and the metrics of the
    run's summary.json. The token comes from the environment (HF_TOKEN, or `hf auth login`) and is never printed or
    written.

    Args:
        folder: An adapter folder (e.g. out/finetune/lora/final: LoRA-family adapters go up in PEFT's format), a full
            finetune's folder, a PEFT adapter folder, or a merged model folder (`leantune merge` / `export --format hf`).
        repo_id: The Hub repo, e.g. your-name/smollm2-lora (created if missing); required.
        checkpoint_dir: The base model folder, to convert a leantune adapter to PEFT's format (default: the one the
            run recorded).
        run_dir: Where the run's run.json and summary.json are (default: the folder, then its parents).
        base_model: The base's Hub id for the card (default: read from the checkpoint path, e.g.
            checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct -> HuggingFaceTB/SmolLM2-135M-Instruct).
        private: Create the repo private.
        revision: Branch to commit to (default: main).
        commit_message: The commit's message.
        endpoint: Hub address (default: HF_ENDPOINT or https://huggingface.co).
        dry_run: Print the card and the files that would go up; send nothing.
    """
    if not repo_id:
        raise ValueError("--repo_id is required: the Hub repo to push to, e.g. --repo_id your-name/smollm2-lora")
    check_folder("folder", folder)
    check_folder("run_dir", run_dir)
    check_folder("checkpoint_dir", checkpoint_dir)
    url, plan = push(folder, repo_id, checkpoint_dir, run_dir, base_model, private, revision, commit_message,
                     endpoint, dry_run)
    print(("would upload: " if dry_run else "uploaded: ") + ", ".join(sorted(plan.files)))
    if url:
        print(url)
    return url
