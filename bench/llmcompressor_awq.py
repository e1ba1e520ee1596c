"""llm-compressor's AWQModifier then QuantizationModifier (asymmetric groups) on a transformers model folder, fed
the token windows it is given; writes the compressed-tensors folder and prints {"seconds": ...}. Run by
awq_quality.py with the python of a venv that has llm-compressor; imports nothing of cpmkit. On a CPU-only torch
its activation cache's pin_memory fails, so that is made a no-op."""

import argparse
import json
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache

IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("tokens", help="a torch file holding an int64 [samples, seqlen] tensor")
parser.add_argument("out")
parser.add_argument("--bits", type=int, default=4)
parser.add_argument("--group", type=int, default=128)
args = parser.parse_args()

tokens = torch.load(args.tokens, weights_only=True)
data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
weights = {"num_bits": args.bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": args.group}
recipe = [AWQModifier(duo_scaling=True, n_grid=20),
          QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                               ignore=["lm_head"])]
start = time.perf_counter()
oneshot(model=args.model, dataset=data, recipe=recipe, max_seq_length=tokens.shape[1],
        num_calibration_samples=tokens.shape[0], shuffle_calibration_samples=False, output_dir=args.out,
        save_compressed=True)
print(json.dumps({"seconds": time.perf_counter() - start}))
