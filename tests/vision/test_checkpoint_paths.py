"""checkpoint_path as package://<package>/<file>: a file shipped inside an installed Python package."""

from pathlib import Path

import pytest
import timm
import timm.models

from vlm.errors import UserError
from vlm.vision import VisionConfig, build_vision_encoder, read_state_dict, resolve_checkpoint_path


def test_package_path_resolves_to_the_installed_file():
    assert resolve_checkpoint_path("package://timm/__init__.py") == Path(timm.__file__)
    assert resolve_checkpoint_path("package://timm.models/__init__.py") == Path(timm.models.__file__)
    assert resolve_checkpoint_path("package://timm/models/__init__.py") == Path(timm.models.__file__)
    assert resolve_checkpoint_path("plain/w.pt") == Path("plain/w.pt")


def test_package_path_reaches_the_loader():
    # resolved before reading: the error is the reader's, naming the file inside the package
    with pytest.raises(ValueError, match=f"cannot read vision checkpoint {timm.__file__}"):
        read_state_dict("package://timm/__init__.py")
    with pytest.raises(ValueError, match=f"cannot read vision checkpoint {timm.__file__}"):
        build_vision_encoder(VisionConfig(model="resnet10t", image_size=32,
                                          checkpoint_path="package://timm/__init__.py"))


@pytest.mark.parametrize("path,message", [
    ("package://surely_not_installed_pkg/w.pt",
     "vision checkpoint package://surely_not_installed_pkg/w.pt: package 'surely_not_installed_pkg' is not installed "
     "(pip install surely_not_installed_pkg)"),
    ("package://surely_not_installed_pkg.sub/w.pt", "(pip install surely_not_installed_pkg)"),
    ("package://timm/weights/none.pth", "package 'timm' has no file weights/none.pth (looked for "),
    ("package://abc/w.pt", "'abc' is a module, not a package"),
])
def test_package_path_errors_are_one_line(path, message):
    for load in (resolve_checkpoint_path, read_state_dict,
                 lambda p: build_vision_encoder(VisionConfig(model="resnet10t", image_size=32, checkpoint_path=p))):
        with pytest.raises(UserError) as caught:
            load(path)
        assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("path", ["package://timm", "package://timm/", "package:///w.pt", "package://1timm/w.pt"])
def test_malformed_package_path_is_a_config_error(path):
    with pytest.raises(ValueError, match="package://<python package>/<path inside the package>"):
        VisionConfig(model="resnet10t", checkpoint_path=path)
