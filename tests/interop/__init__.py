"""Tests of src/cratevit/interop/: timm registration and model contract, the Hugging Face Hub mixin, export (safetensors, Hub folders, ONNX)."""
