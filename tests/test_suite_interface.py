"""The suite interface: declarations, registry (built-in, registered, entry-point plugins),
presets, coefficient choice, RESULTS.md sections, and that declarations import light."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import ClassVar

import pytest
from pydantic import BaseModel, ConfigDict
from tvsplit.tasks.suites import registry
from tvsplit.tasks.suites.base import (
    MethodSpec,
    ModelPool,
    Record,
    Suite,
    SuiteError,
    SuiteResult,
    Trial,
    grid,
)
from tvsplit.tasks.suites.results import HEADER, read_section, replace_section


class ToySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    scales: tuple[float, ...] = (0.5, 1.0)


class ToySuite(Suite):
    name = "toy-interface"
    settings_model = ToySettings
    presets: ClassVar = {"small": {"scales": (1.0,)}, "full": {}}

    def build(self, progress):
        spec = {"families": {"toy": {"base": "/b", "members": {"a": "/a", "b": "/b2"}}}}
        return ModelPool.from_spec(spec, labels={"toy": "seed-0"})

    def evaluation(self, pool):
        raise NotImplementedError

    def methods(self, pool):
        return [MethodSpec("base", "base"), MethodSpec("ta", "task_arithmetic", grid(scale=(1.0,)))]

    def report(self, result, context):
        return "## Toy\n\n" + result.markdown_table()


def test_grid_is_the_product_in_order():
    assert grid(scale=(0.5, 1.0), w=(1, 2)) == (
        {"scale": 0.5, "w": 1},
        {"scale": 0.5, "w": 2},
        {"scale": 1.0, "w": 1},
        {"scale": 1.0, "w": 2},
    )
    assert grid() == ({},)


class Other(BaseModel):
    pass


def test_presets_validate_and_unknown_ones_are_named(tmp_path):
    suite = ToySuite.from_preset("small", tmp_path)
    assert suite.settings.scales == (1.0,) and suite.preset == "small"
    assert ToySuite.preset_settings("full", scales=(2.0,)).scales == (2.0,)
    with pytest.raises(SuiteError, match="no preset 'huge'.*small, full"):
        ToySuite.preset_settings("huge")
    with pytest.raises(SuiteError, match="preset 'small'"):
        ToySuite.preset_settings("small", scales="x")
    with pytest.raises(SuiteError, match="settings must be a ToySettings"):
        ToySuite(Other(), tmp_path)


def test_pool_from_spec_keeps_family_and_member_order():
    pool = ToySuite.from_preset("small", "/tmp").build(print)
    (family,) = pool.families
    assert (family.name, family.label, family.base) == ("toy", "seed-0", "/b")
    assert list(family.members) == ["a", "b"]


def test_default_choice_is_the_best_score_first_on_ties(tmp_path):
    suite = ToySuite.from_preset("small", tmp_path)
    trials = [Trial({"s": i}, {}, score) for i, score in enumerate([1.0, 3.0, 3.0, 2.0])]
    assert suite.choose(MethodSpec("x", "task_arithmetic"), trials, {}) == 1

    class Lower(ToySuite):
        higher_is_better = False

    assert Lower.from_preset("small", tmp_path).choose(MethodSpec("x", "y"), trials, {}) == 0
    assert suite.score({"a": 1.0, "b": 3.0}) == 2.0


def test_registry_registers_lists_and_names_the_choices():
    registry.register(ToySuite)
    assert registry.get_suite("toy-interface") is ToySuite
    assert "toy-interface" in registry.suite_names()
    with pytest.raises(SuiteError, match="no suite 'nope'; registered suites: .*toy-interface"):
        registry.get_suite("nope")

    class NoFull(ToySuite):
        name = "no-full"
        presets: ClassVar = {"small": {}}

    with pytest.raises(SuiteError, match="no 'full' preset"):
        registry.register(NoFull)
    with pytest.raises(SuiteError, match="not a Suite subclass"):
        registry.register(int)


def test_entry_point_plugin_is_found(tmp_path, monkeypatch):
    """A suite from another installed package, found through the ``tvsplit.suites`` group."""
    package = tmp_path / "toy_plugin"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel
            from tvsplit.tasks.suites.base import Suite

            class PluginSuite(Suite):
                name = "plugin-toy"
                settings_model = BaseModel
                def build(self, progress): ...
                def evaluation(self, pool): ...
                def methods(self, pool): return []
                def report(self, result, context): return "## Plugin"
            """
        )
    )
    dist = tmp_path / "toy_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[tvsplit.suites]\nplugin-toy = toy_plugin:PluginSuite\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugin-toy" in registry.suite_names()
    cls = registry.get_suite("plugin-toy")
    assert cls.__name__ == "PluginSuite" and cls.__module__ == "toy_plugin"


def test_broken_plugin_says_which_entry_point(tmp_path, monkeypatch):
    dist = tmp_path / "broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tvsplit.suites]\nbroken = no_such_module:X\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SuiteError, match="entry point 'broken'.*no_such_module"):
        registry.get_suite("broken")


def test_result_tables_and_paired_differences():
    result = SuiteResult("toy", "small", ("s0", "s1"))
    for family, shift in (("s0", 0.0), ("s1", 2.0)):
        for row, value in (("base", 1.0), ("ta", 4.0)):
            metrics = {"a": value + shift, "b": value + shift}
            result.records.append(
                Record(row, family, {}, metrics, metrics, value + shift, value + shift)
            )
    assert result.rows == ["base", "ta"] and result.metrics == ["a", "b"]
    assert result.paired_difference("ta", "base") == [3.0, 3.0]
    assert result.metric_summary("ta", "a")[0] == pytest.approx(5.0)
    table = result.markdown_table()
    assert "| `ta` | 5.0 ± 1.4 | 5.0 ± 1.4 | **5.0 ± 1.4** |" in table


def test_mean_and_spread_of_a_metric_a_row_lacks_are_nan_not_an_error():
    import math

    from tvsplit.tasks.suites.base import mean_std

    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, 0.0)
    # the style suite's `individual` row has no confidence over 3 seeds: the full run's
    # MLflow step raised AttributeError in statistics.stdev before this
    assert all(math.isnan(v) for v in mean_std([math.nan, math.nan, math.nan]))
    assert all(math.isnan(v) for v in mean_std([1.0, math.nan]))
    assert all(math.isnan(v) for v in mean_std([-math.inf, math.inf, 1.0]))


def test_results_sections_rewrite_only_their_own():
    text = replace_section("# old vision file, no markers\n", "vision", "## Vision\n\nv1")
    assert text.startswith(HEADER) and "old vision file" not in text
    text = replace_section(text, "detox", "## Detox\n\nd1")
    text = replace_section(text, "vision", "## Vision\n\nv2")
    assert read_section(text, "vision") == "## Vision\n\nv2"
    assert read_section(text, "detox") == "## Detox\n\nd1"
    assert text.index("## Vision") < text.index("## Detox")  # a rerun keeps the order
    again = replace_section(text, "vision", "## Vision\n\nv2")
    assert again == text
    with pytest.raises(ValueError, match="no end marker"):
        replace_section("<!-- tvsplit:suite x begin -->\n", "x", "b")


def test_declarations_import_without_heavy_packages():
    """Listing suites and reading their presets costs no torch/Prefect/Dask/MLflow import."""
    code = textwrap.dedent(
        """
        import sys
        from tvsplit.tasks.suites.registry import available_suites
        for cls in available_suites().values():
            for preset in cls.presets:
                cls.preset_settings(preset)
        heavy = [m for m in ("torch", "prefect", "dask", "mlflow", "transformers", "zarr")
                 if m in sys.modules]
        print(",".join(heavy))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"declarations imported {out.stdout.strip()}"
