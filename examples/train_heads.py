"""Train blockwise-parallel-decoding draft heads for a base model on local text / jsonl files.

One process (frozen base, 4 heads; `--head_type recurrent` for heads that read the tokens they follow):

    python examples/train_heads.py --base_model reference/base --train_files data/train.jsonl \
        --output_dir runs/heads --num_draft_heads 4 --seq_len 256 --per_device_train_batch_size 8 \
        --learning_rate 1e-3 --max_steps 2000 --logging_steps 50 --save_steps 500

Joint training with LoRA adapters and self-distillation: add `--use_lora --lora_target_modules q_proj v_proj
--base_loss_weight 1.0 --heads_learning_rate_multiplier 4 --distillation hard`.

Several processes (DDP) run the same script unchanged:

    accelerate launch --num_processes 8 examples/train_heads.py ...              # 8 GPUs
    accelerate launch --multi_gpu --num_processes 2 examples/train_heads.py --use_cpu ...  # 2 CPU processes (gloo)
    accelerate launch --config_file deepspeed_zero2.yaml examples/train_heads.py ...

Every `BPDTrainingArguments` / `TrainingArguments` flag works (`--help` lists them). The output folder holds the heads
(`bpd_heads.safetensors`), LoRA adapters when used (`adapter/`), the tokenizer and a model card (`README.md`);
`BPDForCausalLM.from_pretrained(output_dir)` loads them onto the base model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser  # noqa: E402

from hf_bpd import BPDForCausalLM  # noqa: E402
from hf_bpd.data import load_packed_dataset  # noqa: E402
from hf_bpd.heads import HEAD_TYPES  # noqa: E402
from hf_bpd.trainer import BPDTrainer, BPDTrainingArguments, check_tokenizer_matches  # noqa: E402

logger = logging.getLogger("train_heads")


@dataclass
class ModelArguments:
    base_model: str = field(metadata={"help": "Hub id or local path of the base causal LM (kept frozen)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer to use; defaults to --base_model's."})
    num_draft_heads: int = field(default=4, metadata={"help": "h, the number of draft heads."})
    head_type: str = field(
        default="resblock",
        metadata={
            "help": "Draft head architecture: independent ('resblock', 'ffn', 'lora') or token-conditioned "
            "('recurrent': each head also reads the tokens drafted before it; hf_bpd.recurrent_heads).",
            "choices": sorted(HEAD_TYPES),
        },
    )
    head_num_layers: int = field(default=1, metadata={"help": "Blocks per head."})
    head_hidden_size: int | None = field(
        default=None, metadata={"help": "Inner width of 'ffn' heads; state width of 'recurrent' heads."}
    )
    head_intermediate_size: int | None = field(
        default=None, metadata={"help": "'recurrent' heads: FFN blocks of this inner width instead of ResBlocks."}
    )
    head_rank: int = field(default=16, metadata={"help": "Rank of 'lora' heads."})
    share_lm_head: bool = field(default=True, metadata={"help": "Heads project with the base model's lm_head."})
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype the base model is loaded in.", "choices": ["float32", "bfloat16", "float16", "auto"]},
    )


@dataclass
class DataArguments:
    train_files: list[str] = field(metadata={"help": "Training .txt / .jsonl / .json files."})
    eval_files: list[str] | None = field(default=None, metadata={"help": "Held-out files for per-head accuracy."})
    text_column: str = field(default="text", metadata={"help": "Text column of the JSON files."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per packed training block."})
    one_example_per_file: bool = field(
        default=True, metadata={"help": "A .txt file is one document (True) or one document per line (False)."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream and pack the files lazily (large corpora; needs --max_steps)."}
    )


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, BPDTrainingArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if args.should_log else logging.WARNING,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer or model_args.base_model)
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    base = AutoModelForCausalLM.from_pretrained(model_args.base_model, dtype=dtype)
    model = BPDForCausalLM.from_base(
        base,
        base_model_name_or_path=model_args.base_model,
        num_draft_heads=model_args.num_draft_heads,
        head_type=model_args.head_type,
        head_num_layers=model_args.head_num_layers,
        head_hidden_size=model_args.head_hidden_size,
        head_intermediate_size=model_args.head_intermediate_size,
        head_rank=model_args.head_rank,
        share_lm_head=model_args.share_lm_head,
    )
    check_tokenizer_matches(tokenizer, model)

    min_tokens = model_args.num_draft_heads + 2  # shorter documents give no head a target
    with args.main_process_first(desc="packing the data"):
        pack = dict(
            tokenizer=tokenizer,
            seq_len=data_args.seq_len,
            text_column=data_args.text_column,
            min_tokens=min_tokens,
            one_example_per_file=data_args.one_example_per_file,
            streaming=data_args.streaming,
        )
        train = load_packed_dataset(data_args.train_files, **pack)
        evaluation = load_packed_dataset(data_args.eval_files, **pack) if data_args.eval_files else None

    trainer = BPDTrainer(
        model,
        args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        training_data=list(data_args.train_files),
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if evaluation is not None:
        trainer.evaluate()
    trainer.save_model()
    if args.push_to_hub:
        trainer.push_to_hub()
    logger.info("Draft heads saved to %s.", args.output_dir)
    # Tear the process group down before exit (torch asks for it): left to interpreter shutdown, gloo's threads can
    # abort a rank ("terminate called without an active exception") after the work is done. All ranks meet first:
    # rank 0 saves while the others are done, and a rank that enters the teardown after rank 0 (the store's host)
    # has exited waits forever (seen under load: rank 1 stuck in destroy_process_group, the launcher never returns).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
