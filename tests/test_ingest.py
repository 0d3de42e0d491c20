"""SampleFactory.rated: the float32 fast path builds exactly what the general path builds."""

from __future__ import annotations

import numpy as np
import pytest

from sona.config import SonaLlmConfig
from sona.errors import InvalidInputError
from sona.ingest import SampleFactory
from sona.lora_config import MicroLoraConfig, TargetModule


@pytest.fixture
def factory() -> SampleFactory:
    micro = MicroLoraConfig.for_hidden_dim(8, rank=1, target_modules=(TargetModule.Q_PROJ,))
    return SampleFactory(SonaLlmConfig(micro_lora=micro), None)


def test_fast_and_general_paths_agree(factory: SampleFactory) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(8).astype(np.float32)
    y = rng.standard_normal(8).astype(np.float32)
    fast = factory.rated(x, y, 0.75)
    general = factory.rated(x.astype(np.float64).tolist(), list(y), 0.75)
    for a, b in ((fast.input_embedding, general.input_embedding),
                 (fast.output_embedding, general.output_embedding)):  # fmt: skip
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float32 and not a.flags.writeable
    assert fast.quality == general.quality == 0.75 and fast.feedback is None
    x[0] += 1.0  # the sample owns a copy
    assert fast.input_embedding[0] != x[0]


@pytest.mark.parametrize("where", ["query", "response"])
def test_fast_path_rejects_non_finite_values(factory: SampleFactory, where: str) -> None:
    x = np.ones(8, np.float32)
    y = np.ones(8, np.float32)
    (x if where == "query" else y)[3] = np.nan
    name = "input_embedding" if where == "query" else "output_embedding"
    with pytest.raises(InvalidInputError, match=name):
        factory.rated(x, y, 0.5)


@pytest.mark.parametrize("quality", [1.5, -0.1, float("nan")])
def test_fast_path_still_rejects_bad_quality(factory: SampleFactory, quality: float) -> None:
    with pytest.raises(InvalidInputError, match="quality"):
        factory.rated(np.ones(8, np.float32), np.ones(8, np.float32), quality)


class _FixedEmbedder:
    """An embedder that ignores what it is asked for, as a misconfigured one would."""

    def __init__(self, vector: object) -> None:
        self.vector = vector

    def embed(self, text: str, dim: int) -> object:
        return self.vector


@pytest.mark.parametrize("vector", [np.ones(5, np.float32), np.ones((1, 8), np.float32)])
@pytest.mark.parametrize("where", ["query", "response"])
def test_an_embedding_of_the_wrong_shape_is_blamed_on_the_embedder(
    vector: np.ndarray, where: str
) -> None:
    micro = MicroLoraConfig.for_hidden_dim(8, rank=1, target_modules=(TargetModule.Q_PROJ,))
    factory = SampleFactory(SonaLlmConfig(micro_lora=micro), _FixedEmbedder(vector))
    good = np.ones(8, np.float32)
    args = ("some text", good) if where == "query" else (good, "some text")
    with pytest.raises(InvalidInputError, match=rf"embedding of {where} .*_FixedEmbedder") as info:
        factory.rated(*args, 0.5)
    assert "(8,)" in str(info.value) and str(vector.shape) in str(info.value)
