"""NF4 (4-bit NormalFloat, QLoRA paper): blocks of 64 weights share an absmax scale, and the scales
are quantized again to 8 bits in blocks of 256 (double quantization): ~4.13 bits per weight."""

from __future__ import annotations

import torch

from lorafit.quant.backends import Backend, Storage, quiet_import, register_backend

BLOCK = 64
SCALE_BLOCK = 256


class BitsandbytesNF4(Backend):
    scheme = "nf4"
    library = "bitsandbytes"

    def quantize(self, w: torch.Tensor) -> Storage:
        bnbf = quiet_import("bitsandbytes.functional")

        packed, state = bnbf.quantize_4bit(
            w.contiguous(), blocksize=BLOCK, compress_statistics=True, quant_type="nf4"
        )
        return {
            "packed": packed,  # (out * in / 2, 1) uint8, two codes per byte
            "absmax": state.absmax,  # (blocks,) uint8: the double-quantized scales
            "offset": state.offset,  # () fp32
            "absmax2": state.state2.absmax,  # (blocks / 256,) fp32
            "code2": state.state2.code,  # (256,) fp32
            "code": state.code,  # (16,) fp32: the NF4 levels
            "shape": tuple(w.shape),
        }

    def _state(self, s: Storage, dtype: torch.dtype):
        bnbf = quiet_import("bitsandbytes.functional")

        inner = bnbf.QuantState(
            absmax=s["absmax2"], code=s["code2"], blocksize=SCALE_BLOCK, dtype=torch.float32
        )
        return bnbf.QuantState(
            absmax=s["absmax"],
            shape=torch.Size(s["shape"]),
            code=s["code"],
            blocksize=BLOCK,
            quant_type="nf4",
            dtype=dtype,
            offset=s["offset"],
            state2=inner,
        )

    def dequantize(self, storage: Storage, dtype: torch.dtype) -> torch.Tensor:
        bnbf = quiet_import("bitsandbytes.functional")

        return bnbf.dequantize_4bit(storage["packed"], self._state(storage, dtype))  # (out, in)


class TorchaoNF4(Backend):
    scheme = "nf4"
    library = "torchao"

    def quantize(self, w: torch.Tensor) -> Storage:
        to_nf4 = quiet_import("torchao.quantization.quantize_.workflows.nf4.nf4_tensor").to_nf4

        return {"nf4": to_nf4(w.contiguous(), block_size=BLOCK, scaler_block_size=SCALE_BLOCK)}

    def dequantize(self, storage: Storage, dtype: torch.dtype) -> torch.Tensor:
        return storage["nf4"].get_original_weight().to(dtype)  # (out, in)


register_backend(BitsandbytesNF4())
register_backend(TorchaoNF4())
