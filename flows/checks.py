"""Input checks of `tvsplit edit` and `tvsplit decompose`, run before any flow engine, Dask
cluster or server connection starts.

Guarantees: ``check_edit`` and ``check_decompose`` read the recipe or settings and the
catalogue, write nothing, and raise ``InputError`` (a ``ValueError``) whose one message names
the file, field, option, member, run or value at fault: the whole recipe (`flows.recipe`),
its names, the family, its members (from one family), the decomposition run (present and
complete), ``excluded_from``, the base's identity against the family's, the output folder;
the split settings against the family (``min_tasks`` ≤ members, rank rule, at least two
members), ``--workers`` ≥ 1 and a ``tcp://`` scheduler that answers. This module imports no
torch, Prefect, Dask or MLflow at module level; the catalogue is opened only once the
command line itself is known to be good.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tvsplit.flows.settings import Settings, load_settings, missing_local_catalogue

if TYPE_CHECKING:
    from tvsplit.flows.recipe import Recipe
    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.tasks.split_settings import SplitSettings

#: Seconds a ``tcp://`` scheduler gets to accept a connection before it is reported absent.
SCHEDULER_PROBE_SECONDS = 3.0


class InputError(ValueError):
    """Bad input found before any work started; the message names what is wrong and where."""


class DecomposeError(RuntimeError):
    """A decomposition that cannot start or did not finish; the message says why."""


class SchedulerLostError(DecomposeError):
    """The connection to the Dask scheduler was lost mid-run; what was saved is kept and a
    rerun finishes the run."""


# --------------------------------------------------------------------------- edit
@dataclass(frozen=True)
class CheckedEdit:
    """A recipe checked against the catalogue, and where its output goes."""

    recipe: Recipe
    target: Path
    settings: Settings


def output_target(recipe: Recipe, output: str | None, settings: Settings) -> Path:
    """Where an edit writes: ``--out``, else the recipe's ``output``, else
    ``<models>/<family>-<method>`` under the data folder's models setting; absolute, so
    messages name one place whatever the working directory."""
    path = output or recipe.output or settings.models / f"{recipe.family}-{recipe.method}"
    return Path(path).absolute()


def lora_folder(output: Path) -> Path:
    """Where the LoRA export of the model at ``output`` goes: ``<output>-lora`` beside it."""
    return output.with_name(output.name + "-lora")


def check_output(target: Path, *, overwrite: bool) -> None:
    """Refuse an output that exists (without ``overwrite``) or is not a folder, and an
    output inside a file; finish a replacement a killed edit left half done first."""
    from tvsplit.storage.folders import recover_replacement

    for parent in target.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"--out: {parent} is a file, so {target} cannot be a folder")
    for path in (target, lora_folder(target)):
        if path.exists() and not path.is_dir():
            raise InputError(f"--out: {path} is a file, not a model folder; choose another --out")
    recover_replacement(target)
    for path in (target, lora_folder(target)):
        if path.exists() and not overwrite:
            raise InputError(f"--out: {path} exists; pass --overwrite or choose another --out")


def check_edit(
    recipe_path: str | Path,
    *,
    output: str | None = None,
    overwrite: bool = False,
    catalogue_url: str | None = None,
    allow_other_base: bool = False,
) -> CheckedEdit:
    """The whole edit checked: recipe, catalogue, base identity, output (see the module)."""
    from tvsplit.flows.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(recipe_path)
    except RecipeError as error:
        raise InputError(str(error)) from None
    settings = load_settings(catalogue=catalogue_url)
    target = output_target(recipe, output, settings)
    check_output(target, overwrite=overwrite)
    if missing_local_catalogue(settings.catalogue):
        raise InputError(_no_family(str(recipe_path), recipe.family, settings.catalogue, []))
    from tvsplit.storage.catalogue import Catalogue

    catalogue = Catalogue(settings.catalogue)
    check_recipe_members(catalogue, recipe, source=str(recipe_path))
    from tvsplit.tasks.edit_job import EditPlanError, plan_edit

    try:
        plan_edit(
            catalogue, recipe.family, recipe.method, recipe.member_names, recipe.method_params,
            recipe.member_params, recipe.decomposition, recipe.edit_method.needs_split,
        )  # fmt: skip
    except EditPlanError as error:
        raise InputError(f"{recipe_path}: {error}") from None
    check_base(catalogue, recipe, allow_other_base=allow_other_base, source=str(recipe_path))
    return CheckedEdit(recipe, target, settings)


def _no_family(source: str, family: str, url: str, families: Sequence[str]) -> str:
    return (
        f"{source}: family: no family {family!r} in catalogue {url} "
        f"(families: {', '.join(families) or 'none'})"
    )


def check_recipe_members(catalogue: Catalogue, recipe: Recipe, *, source: str) -> None:
    """The family exists, and every member (and ``excluded_from``) is a complete member of
    it; a member found in another family is named as such (a recipe's members come from
    one family)."""
    families = catalogue.families()
    if recipe.family not in families:
        raise InputError(_no_family(source, recipe.family, catalogue.url, families))
    available = catalogue.members(recipe.family)
    wanted = [(f"members[{i}].name", name) for i, name in enumerate(recipe.member_names)]
    if recipe.excluded_from != "base":
        wanted.append(("excluded_from", recipe.excluded_from))
    for field, name in wanted:
        if name in available:
            continue
        elsewhere = [f for f in families if f != recipe.family and name in catalogue.members(f)]
        if elsewhere:
            raise InputError(
                f"{source}: {field}: {name!r} is a member of family {elsewhere[0]!r}, not of "
                f"{recipe.family!r}; an edit's members all come from the recipe's family"
            )
        raise InputError(
            f"{source}: {field}: family {recipe.family!r} has no member {name!r} "
            f"(members: {', '.join(available) or 'none'})"
        )


def check_base(
    catalogue: Catalogue, recipe: Recipe, *, allow_other_base: bool, source: str
) -> None:
    """The recipe's ``base`` opens as a full model and is the family's base
    (`storage.base_identity`), unless ``allow_other_base``."""
    from tvsplit.storage.base_identity import base_mismatch
    from tvsplit.storage.errors import StorageError
    from tvsplit.storage.sources import open_source

    try:
        opened = open_source(recipe.base)
        if opened.checkpoint is None:
            raise InputError(
                f"{source}: base: {recipe.base!r} is not a full model (a {opened.kind})"
            )
        if allow_other_base:
            return
        info = catalogue.entry(recipe.family)
        problem = base_mismatch(opened, info.attrs if info is not None else {})
    except StorageError as error:
        raise InputError(f"{source}: base: {error}") from None
    if problem:
        raise InputError(
            f"{source}: base: {recipe.base!r} is not the base of family {recipe.family!r} "
            f"({problem}); pass --allow-other-base to edit it anyway"
        )


# --------------------------------------------------------------------------- decompose
def plan(
    catalogue: Catalogue, family: str, members: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """The members (sorted) and the parameters every one of them holds; DecomposeError for
    an unknown family or member, or fewer than two members."""
    if family not in catalogue.families():
        known = ", ".join(catalogue.families()) or "none"
        raise DecomposeError(
            f"no family {family!r} in catalogue {catalogue.url} (families: {known})"
        )
    available = catalogue.members(family)
    chosen = sorted(members) if members else available
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise DecomposeError(
            f"family {family!r} has no complete member {unknown[0]!r} (members: {', '.join(available) or 'none'})"
        )
    if len(chosen) < 2:
        raise DecomposeError(
            f"family {family!r}: a split needs at least 2 members, got {len(chosen)}"
        )
    first = catalogue.parameters(family, chosen[0])
    common = set(first).intersection(*(catalogue.parameters(family, m) for m in chosen[1:]))
    return chosen, [p for p in first if p in common]


def split_settings(values: Mapping[str, Any]) -> SplitSettings:
    """``SplitSettings`` from the command line's flags; InputError naming each flag."""
    from pydantic import ValidationError
    from tvsplit.storage.errors import format_validation_error
    from tvsplit.tasks.split_settings import SplitSettings

    try:
        return SplitSettings(**values)
    except ValidationError as error:
        raise InputError(format_validation_error(error, flag=True)) from None


def check_settings_for_family(settings: SplitSettings, members: int) -> None:
    """The estimator's parameters fit a family of ``members`` members (``--min-tasks``)."""
    from tvsplit.tasks.estimators import get_estimator

    estimator = get_estimator(settings.method)
    try:
        estimator.threshold(estimator.parse(settings.estimator_params()), members)
    except ValueError as error:
        flag = "--min-tasks" if "min_tasks" in str(error) else f"--method {settings.method}"
        raise InputError(f"{flag}: {error} (the split has {members} members)") from None


def check_scheduler(address: str | None) -> None:
    """A ``tcp://host:port`` scheduler accepts a connection within SCHEDULER_PROBE_SECONDS
    (other address kinds are left to Dask)."""
    if address is None or not address.startswith("tcp://"):
        return
    parts = urlsplit(address)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise InputError(f"--scheduler: {address!r} is not tcp://HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=SCHEDULER_PROBE_SECONDS):
            pass
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise InputError(
            f"--scheduler: nothing answers at {address} ({reason}); start the scheduler "
            "(`dask scheduler`) or leave --scheduler out for a local cluster"
        ) from None


def check_workers(workers: int) -> None:
    """A local cluster needs at least one worker (``--workers 0`` would wait forever)."""
    if workers < 1:
        raise InputError(f"--workers: must be at least 1, not {workers}")


def check_decompose(
    family: str,
    *,
    members: Sequence[str] | None,
    split: Mapping[str, Any],
    workers: int,
    scheduler: str | None,
    catalogue_url: str | None,
) -> SplitSettings:
    """The whole decomposition checked (see the module); returns its settings."""
    check_workers(workers)
    settings = split_settings(split)
    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.storage.names import check_node_name

    for kind, name in [("family", family), *(("member", m) for m in members or ())]:
        try:
            check_node_name(kind, name)
        except ValueError as error:
            raise InputError(str(error)) from None
    catalogue = Catalogue(load_settings(catalogue=catalogue_url).catalogue)
    try:
        chosen, _ = plan(catalogue, family, members)
    except DecomposeError as error:
        raise InputError(str(error)) from None
    check_settings_for_family(settings, len(chosen))
    check_scheduler(scheduler)
    return settings
