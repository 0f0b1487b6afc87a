"""String options keep the words YAML 1.1 reads as booleans (`off`, `on`, `yes`, `no`, `true`, `false`):
`sampler.parallel=off`, as the docs spell it, was refused as "got 'False'". One rule in `config.load_config`
covers every string-typed option of every config, on the command line and in YAML files."""

import dataclasses
import types
import typing

import pytest
import yaml

import illada_lightning.config as config_module
from experiments.generate import GenerateConfig
from illada_lightning.config import ConfigError, load_config
from illada_lightning.evaluation.cli import EvaluateConfig
from illada_lightning.experiment.config import ExperimentConfig
from illada_lightning.sweeps.multirun import parse_multirun
from illada_lightning.sweeps.spec import SweepSpec

WORDS = ("off", "on", "yes", "no", "true", "false", "Off", "NO")


def string_fields(schema, prefix=""):
    """Every dotted key whose declared type is str or str | None, walking nested dataclasses."""
    for f in dataclasses.fields(schema):
        tp = typing.get_type_hints(schema)[f.name]
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        args = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            yield from string_fields(args[0], f"{prefix}{f.name}.")
        elif args == [str]:
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("schema", [ExperimentConfig, EvaluateConfig, GenerateConfig, SweepSpec])
def test_every_string_option_keeps_boolean_words_as_written(schema, monkeypatch, tmp_path):
    monkeypatch.setattr(config_module, "_validate_tree", lambda obj: None)  # the words, not each option's choices
    keys = list(string_fields(schema))
    assert len(keys) >= 3, keys
    words = {key: WORDS[i % len(WORDS)] for i, key in enumerate(keys)}
    on_the_command_line = load_config(schema, None, [f"{key}={word}" for key, word in words.items()])
    nested: dict = {}  # the same words in a YAML file, nested as the keys say
    for key, word in words.items():
        *groups, leaf = key.split(".")
        node = nested
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = word
    path = tmp_path / "words.yaml"
    path.write_text(yaml.safe_dump(nested).replace("'", ""))  # unquoted, as a user writes them
    in_a_file = load_config(schema, path)
    for key, word in words.items():
        assert (_get(on_the_command_line, key), _get(in_a_file, key)) == (word, word), key


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_sampler_parallel_off_as_the_docs_spell_it(tmp_path):
    ev = load_config(EvaluateConfig, None, ["ckpt=x", "sampler.parallel=off", "scoring.parallel=off"])
    assert (ev.sampler.parallel, ev.scoring.parallel) == ("off", "off")
    path = tmp_path / "exp.yaml"
    path.write_text("eval:\n  sampler: {parallel: off, cache: none}\n  scoring:\n    parallel: off\n")
    exp = load_config(ExperimentConfig, path, ["eval.sampler.parallel=threshold"])
    assert exp.eval.sampler.parallel == "threshold" and exp.eval.scoring.parallel == "off"
    # a word that is not one of the choices is still refused, naming what was written
    with pytest.raises(ConfigError, match="got 'yes'"):
        load_config(EvaluateConfig, None, ["ckpt=x", "sampler.parallel=yes"])


def test_boolean_options_still_read_every_boolean_word():
    for word, value in (("on", True), ("yes", True), ("true", True), ("off", False), ("no", False)):
        cfg = load_config(EvaluateConfig, None, ["ckpt=x", f"sampler.variable_length={word}",
                                                 f"chat_template={word}"])
        assert cfg.sampler.variable_length is value and cfg.chat_template is value
    with pytest.raises(ConfigError, match="variable_length"):
        load_config(EvaluateConfig, None, ["ckpt=x", "sampler.variable_length=maybe"])


def test_lists_of_strings_and_untyped_sweep_choices():
    cfg = load_config(GenerateConfig, None, ["ckpt=README.md", "prompt=x", "sampler.stop_strings=[off,no,'yes']"])
    assert cfg.sampler.stop_strings == ["off", "no", "yes"]
    # `choices` has no declared type: only true/false are booleans there (YAML 1.2), the other words stay words
    spec = load_config(SweepSpec, None, ["space={a: {choices: [off, threshold]}, b: {choices: [true, false]}}"])
    assert spec.space["a"].choices == ["off", "threshold"] and spec.space["b"].choices == [True, False]
    multirun = parse_multirun(["--multirun", "eval.sampler.parallel=off,threshold", "eval.sampler.cache=none,dual",
                               "progress_bar=false"])
    assert multirun.space["eval.sampler.parallel"].choices == ["off", "threshold"]
    assert multirun.overrides == ["progress_bar=false"]
