"""llm-compressor's GPTQModifier on a transformers model folder, fed the token windows it is given; writes the
compressed-tensors folder and prints {"seconds": ...}. Run by gptq_quality.py with the python of a venv that
has llm-compressor (its own torch and transformers); imports nothing of cpmkit."""

import argparse
import json
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("tokens", help="a torch file holding an int64 [samples, seqlen] tensor")
parser.add_argument("out")
parser.add_argument("--bits", type=int, default=4)
parser.add_argument("--group", type=int, default=128)
parser.add_argument("--actorder", choices=["none", "static"], default="none")
args = parser.parse_args()

torch.set_num_threads(torch.get_num_threads())
tokens = torch.load(args.tokens, weights_only=True)
data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
weights = {"num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": args.group}
# the modifier's own actorder overrides the scheme's; left unset it is "static"
recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                      dampening_frac=0.01, block_size=128, actorder=None if args.actorder == "none" else args.actorder)
start = time.perf_counter()
oneshot(model=args.model, dataset=data, recipe=recipe, max_seq_length=tokens.shape[1],
        num_calibration_samples=tokens.shape[0], shuffle_calibration_samples=False, output_dir=args.out,
        save_compressed=True)
print(json.dumps({"seconds": time.perf_counter() - start}))
