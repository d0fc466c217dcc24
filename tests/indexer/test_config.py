"""Config dataclasses describe themselves: every field has a one-line help, bad values name the fix."""

from dataclasses import fields

import pytest

from db.errors import InputError
from indexer.config import BuildConfig, GradientConfig, config_help


def test_every_field_carries_one_line_of_help():
    for cls in (BuildConfig, GradientConfig):
        for f in fields(cls):
            text = config_help(cls, f.name)
            assert text and "\n" not in text, (cls.__name__, f.name)
    assert "IVF" in config_help(BuildConfig, "nprobe")
    with pytest.raises(KeyError):
        config_help(BuildConfig, "no_such_field")


@pytest.mark.parametrize("make,flag", [
    (lambda: BuildConfig(batch_size=0), "--batch-size"),
    (lambda: BuildConfig(shard_size=0), "--shard-size"),
    (lambda: BuildConfig(nprobe=0), "--nprobe"),
    (lambda: BuildConfig(chunking="spiral"), "--chunking"),
    (lambda: BuildConfig(chunking="packed", stride=8), "--stride"),
    (lambda: BuildConfig(factory="IVF,Nonsense"), "--faiss-factory"),
    (lambda: GradientConfig(k_in=0), "--proj"),
    (lambda: GradientConfig(modules="(attn"), "--modules"),
])
def test_a_bad_value_is_an_input_error_naming_its_flag(make, flag):
    with pytest.raises(InputError, match=flag):
        make()
