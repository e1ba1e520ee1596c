"""GPTQModel's view of a GPTQ or AWQ folder on CPU: the dequantized weight of every quantized linear and the logits
for the given token ids. Run by gptqmodel_loads.py with the python of a venv that has GPTQModel 7 (its own torch
and transformers; its torch kernels run float16 or bfloat16, float16 here so the stored scales stay exact);
imports nothing of cpmkit.

    python gptqmodel_logits.py FOLDER IDS.pt OUT.pt --backend gptq_torch
"""

import argparse

import torch
from gptqmodel import BACKEND, GPTQModel

parser = argparse.ArgumentParser()
parser.add_argument("folder")
parser.add_argument("ids")
parser.add_argument("out")
parser.add_argument("--backend", default="gptq_torch")
args = parser.parse_args()



def dequantized(module) -> torch.Tensor:
    """GPTQModel's own dequantization of one linear, [in, out]: GPTQ modules have dequantize_weight, its AWQ torch
    module only the helper its forward uses."""
    if hasattr(module, "dequantize_weight"):
        return module.dequantize_weight()
    probe = torch.empty(1, module.in_features, dtype=torch.float16)
    return module._dequantize_weight_for_inference(probe, dtype=torch.float16)


model = GPTQModel.load(args.folder, device="cpu", backend=BACKEND(args.backend), dtype=torch.float16)
weights = {name: dequantized(module).float().cpu() for name, module in model.model.named_modules()
           if hasattr(module, "qweight") and (hasattr(module, "dequantize_weight")
                                              or hasattr(module, "_dequantize_weight_for_inference"))}
ids = torch.load(args.ids, weights_only=True)
with torch.no_grad():
    logits = model.model(input_ids=ids).logits.float()
torch.save({"weights": weights, "logits": logits}, args.out)
