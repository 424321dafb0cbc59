"""A fine-tuned file through timm's ``pretrained_cfg_overlay=dict(file=...)`` keeps its classifier."""

import pytest
import timm
import torch

import cratevit
from cratevit import create_model


@pytest.fixture
def three_class_file(tmp_path):
    torch.manual_seed(0)
    model = create_model("crate_debug", num_classes=3).eval()
    path = tmp_path / "finetuned.pth"
    cratevit.save_checkpoint(path, model)
    return model, str(path)


def test_num_classes_equal_to_the_file_keeps_the_fine_tuned_head(three_class_file):
    source, path = three_class_file
    model = timm.create_model("crate_debug_patch8_32", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay={"file": path}).eval()  # fmt: skip
    torch.testing.assert_close(model.head.weight, source.head.weight, rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_another_num_classes_re_initialises_the_head(three_class_file):
    source, path = three_class_file
    model = timm.create_model("crate_debug_patch8_32", pretrained=True, num_classes=5,
                              pretrained_cfg_overlay={"file": path})  # fmt: skip
    assert model.head.out_features == 5
    torch.testing.assert_close(model.blocks[1].ista.dictionary, source.blocks[1].ista.dictionary, rtol=0, atol=0)


def test_no_num_classes_for_a_different_head_is_a_clear_error(three_class_file):
    _, path = three_class_file
    with pytest.raises(ValueError, match=r"has a 3-class classifier, crate_debug_patch8_32 has 10; pass num_classes=3"):
        timm.create_model("crate_debug_patch8_32", pretrained=True, pretrained_cfg_overlay={"file": path})
