"""The resnet50 sample's handler, called directly: images in, top-5 out, 400 on anything else.

They need torch and torchvision, and skip without them; with a GPU they run its CUDA path.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.conftest import import_handler

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
image_io = pytest.importorskip("torchvision.io")

RANDOM_WEIGHTS_LINE = "resnet50: RESNET50_WEIGHTS is not set; using random weights (seed 0)"


@pytest.fixture(scope="module")
def loaded() -> tuple[ModuleType, str]:
    """The handler module, imported once without RESNET50_WEIGHTS, and what it wrote to stderr."""
    return import_handler("resnet50", "RESNET50_WEIGHTS")


@pytest.fixture
def handler(loaded: tuple[ModuleType, str]) -> ModuleType:
    return loaded[0]


def picture(channels: int = 3, height: int = 300, width: int = 400) -> Any:
    """A random uint8 image tensor, the same on every call."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=generator)


def jpeg(image: Any) -> bytes:
    return image_io.encode_jpeg(image).numpy().tobytes()


def png(image: Any) -> bytes:
    return image_io.encode_png(image).numpy().tobytes()


def call(handler: ModuleType, body: bytes) -> dict[str, Any]:
    return handler.handle(SimpleNamespace(body=body, headers={}, method="POST"), None)


def test_random_weights_are_announced_once_at_import(loaded: tuple[ModuleType, str]) -> None:
    _, log = loaded
    said = [line for line in log.splitlines() if line.startswith("resnet50:")]
    assert said.count(RANDOM_WEIGHTS_LINE) == 1
    (warmed,) = [line for line in said if line != RANDOM_WEIGHTS_LINE]
    assert warmed.startswith("resnet50: warmed up batches of 1, 2, 4, 8 images in "), said


@pytest.mark.parametrize("encode", [jpeg, png], ids=["jpeg", "png"])
def test_an_image_gets_its_top5(handler: ModuleType, encode: Any) -> None:
    result = call(handler, encode(picture()))

    assert result["statusCode"] == 200
    top5 = result["body"]["top5"]
    json.dumps(top5, allow_nan=False)  # finite numbers, as JSON needs
    assert len(top5) == 5
    assert len({entry["class"] for entry in top5}) == 5
    categories = handler.CATEGORIES
    assert len(categories) == 1000
    for entry in top5:
        assert set(entry) == {"class", "label", "probability"}
        assert entry["label"] == categories[entry["class"]]
        assert 0.0 <= entry["probability"] <= 1.0
    probabilities = [entry["probability"] for entry in top5]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1.0 + 1e-6


def test_seeded_weights_answer_the_same_on_every_replica(handler: ModuleType) -> None:
    body = png(picture())
    again = handler.load_model(None)
    for mine, theirs in zip(handler.MODEL.parameters(), again.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert call(handler, body) == call(handler, body)


@pytest.mark.parametrize(
    "image",
    [picture(1, 64, 48), picture(3, 500, 20), picture(3, 8, 8)],
    ids=["grey", "narrow", "tiny"],
)
def test_grey_narrow_and_tiny_images_are_classified(handler: ModuleType, image: Any) -> None:
    for body in (png(image), jpeg(image)):
        assert call(handler, body)["statusCode"] == 200


def test_preprocessing_matches_torchvisions_imagenet_preset(handler: ModuleType) -> None:
    image = picture()
    preset = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()  # 256 -> 224
    expected = preset(image).unsqueeze(0)

    batch = handler.preprocess(png(image))

    assert batch.shape == (1, 3, 224, 224)
    assert batch.dtype == handler.DTYPE
    assert batch.is_contiguous(memory_format=torch.channels_last)
    # Resizing in uint8 may round a pixel one grey level apart: 1 / (255 * 0.224) after normalising.
    assert torch.allclose(batch.float().cpu(), expected, atol=0.02)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "the body is empty"),
        (b"hello", "not a JPEG or PNG image"),
        (b'{"image": "cat.jpg"}', "not a JPEG or PNG image"),
        (b"GIF89a" + bytes(32), "not a JPEG or PNG image"),
        (jpeg(picture())[:200], "the JPEG image cannot be decoded"),
        (b"\x89PNG\r\n\x1a\n" + bytes(32), "the PNG image cannot be decoded"),
    ],
    ids=["empty", "text", "json", "gif", "truncated-jpeg", "broken-png"],
)
def test_anything_but_an_image_is_refused(handler: ModuleType, body: bytes, message: str) -> None:
    result = call(handler, body)

    assert result["statusCode"] == 400
    error = result["body"]["error"]
    assert message in error
    assert "send the bytes of a JPEG or PNG image as the body" in error
    assert ".cpp" not in error


def test_the_gpu_wait_blocks_unless_told_to_spin(handler: ModuleType) -> None:
    assert handler.GPU_WAIT == "block"
    assert handler.GPU_WAITS == {"spin": False, "block": True}  # torch.cuda.Event(blocking=...)


def test_an_unknown_gpu_wait_stops_the_import_naming_the_choices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RESNET50_GPU_WAIT", "sleep")
    choices = "RESNET50_GPU_WAIT is 'sleep'; set it to one of spin, block"
    with pytest.raises(ValueError, match=choices):
        import_handler("resnet50", "RESNET50_WEIGHTS")


def test_weights_come_from_the_file_named(
    handler: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(7)
    source = torchvision.models.resnet50()
    torch.save(source.state_dict(), tmp_path / "weights.pt")

    model = handler.load_model(str(tmp_path / "weights.pt"))

    assert "RESNET50_WEIGHTS" not in capsys.readouterr().err
    for loaded, saved in zip(model.parameters(), source.parameters(), strict=True):
        assert torch.equal(loaded.cpu(), saved.to(handler.DTYPE))


def test_weights_of_another_model_stop_the_load(handler: ModuleType, tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict"):
        handler.load_model(str(tmp_path / "resnet18.pt"))


def test_a_batch_answers_each_request_as_if_it_came_alone(handler: ModuleType) -> None:
    first, second = jpeg(picture()), png(picture(3, 240, 320))
    bodies = [first, b"hello", second, first, jpeg(picture(3, 64, 64))[:200]]

    answers = handler.handle_batch([SimpleNamespace(body=body) for body in bodies], None)

    assert [answer["statusCode"] for answer in answers] == [200, 400, 200, 200, 400]
    assert "not a JPEG or PNG image" in answers[1]["body"]["error"]
    assert "the JPEG image cannot be decoded" in answers[4]["body"]["error"]
    assert answers[0] == answers[3]
    for answer, body in zip(answers, bodies, strict=True):
        if answer["statusCode"] == 200:
            alone = call(handler, body)["body"]["top5"]
            together = answer["body"]["top5"]
            assert [entry["class"] for entry in together] == [entry["class"] for entry in alone]
            for mine, theirs in zip(together, alone, strict=True):
                assert mine["probability"] == pytest.approx(theirs["probability"], rel=0.02)
    assert answers[0]["body"] != answers[2]["body"]


def smooth_picture(height: int = 300, width: int = 400) -> Any:
    """A colour image of gradients, as photographs mostly are (JPEG's chroma subsampling loses
    the detail of noise, differently in each decoder)."""
    rows = torch.linspace(0, 255, height).view(1, height, 1).expand(1, height, width)
    columns = torch.linspace(0, 255, width).view(1, 1, width).expand(1, height, width)
    return torch.cat([rows, columns, (rows + columns) / 2]).to(torch.uint8)


def test_a_jpeg_decodes_alike_on_every_device(handler: ModuleType) -> None:
    body = jpeg(smooth_picture())

    (image,) = handler.decode([body])
    reference = handler.decode_on_cpu(body, "JPEG")

    assert image.device.type == handler.DEVICE.type
    assert image.dtype == torch.uint8
    assert image.shape == reference.shape == (3, 300, 400)
    difference = (image.cpu().int() - reference.int()).abs()
    assert difference.float().mean() < 1.0
    assert difference.max() <= 8


def test_a_jpeg_the_decoder_refuses_leaves_its_batch_mates_as_they_were(
    handler: ModuleType,
) -> None:
    good, broken = jpeg(picture()), jpeg(picture(3, 64, 64))[:200]

    together = handler.decode([good, broken, good])
    (alone,) = handler.decode([good])

    assert torch.equal(together[0], alone)
    assert torch.equal(together[2], alone)
    assert isinstance(together[1], ValueError)
    assert "the JPEG image cannot be decoded" in str(together[1])
