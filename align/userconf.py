"""A user's folder is a project: `conf/` in the current directory is read ahead of the packaged configs.

A Hydra search-path plugin (`UserConf`, registered by `config.register()`, which every entry point calls) puts that
folder first, so a file there adds an option to any group (scope=, data=, model=, ...) or replaces a shipped one.
It is registered by hand rather than through the `hydra_plugins` namespace package because editable installs hide
namespace packages from Hydra's scan. The CLI's error for an unknown option names the folders (`config_folders`).
"""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PACKAGE_CONF = Path(__file__).resolve().parent / "conf"  # an installed wheel ships the configs inside align/


def packaged_conf_dir() -> Path:
    """The shipped configs: align/conf in a wheel, the repo's conf/ in a source checkout."""
    from importlib.resources import files

    try:
        return Path(str(files("align.conf")))
    except (ModuleNotFoundError, TypeError):
        return PACKAGE_CONF


def user_conf_dir() -> Path | None:
    """./conf when it exists and is not the packaged configs themselves (a clone run from its root)."""
    folder = Path.cwd() / "conf"
    if not folder.is_dir():
        return None
    try:
        if folder.resolve() == packaged_conf_dir().resolve():
            return None
    except OSError:
        pass
    return folder.resolve()


def config_folders() -> list[str]:
    """Where `python -m align` looks for config groups, first match wins."""
    user = user_conf_dir()
    return ([str(user)] if user else []) + [str(packaged_conf_dir())]


class UserConf(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # only search paths that hold align's packaged configs: other Hydra apps in the process keep theirs
        if not any(e.path == "pkg://align.conf" for e in search_path.get_path()):
            return
        folder = user_conf_dir()
        if folder is not None:
            search_path.prepend(provider="align-user", path=f"file://{folder}")


def register_plugin() -> None:
    from hydra.core.plugins import Plugins

    Plugins.instance().register(UserConf)


def find_option(group: str, option: str) -> Path | None:
    """The file `group=option` composes, first match in config_folders()."""
    for folder in config_folders():
        path = Path(folder) / group / f"{option}.yaml"
        if path.is_file():
            return path
    return None


def with_data_scope(overrides: list[str]) -> list[str]:
    """`data=<name>` brings its scope with it: when no scope= is given and the recipe file names one
    (`scope: <name>`), scope=<name> is added. A sweep over data= (a comma) is left alone: each job's build then
    checks that its scope matches in one line."""
    def value(key):
        hits = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=", 1)[0] == key]
        return hits[-1] if hits else None

    data = value("data")
    if data is None or value("scope") is not None or "," in data:
        return list(overrides)
    path = find_option("data", data)
    if path is None:
        return list(overrides)  # Hydra reports the unknown option, with the folders it looked in
    import yaml

    try:
        scope = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("scope")
    except (yaml.YAMLError, AttributeError):
        return list(overrides)  # Hydra reports the broken file
    return list(overrides) + [f"scope={scope}"] if isinstance(scope, str) and scope else list(overrides)


DATA_GROUPS = ("data", "scope", "model")  # the files users write and share: data only, never code


def check_user_configs() -> None:
    """Configs are data: a file in ./conf/{data,scope,model}/ may not name code to run (`_target_`, which Hydra
    instantiates, e.g. as a callback), move itself into the global package (`# @package`), set `hydra:` options, or
    pull other groups into the composition through absolute defaults. One line, naming the file."""
    import yaml

    from align import AlignError

    folder = user_conf_dir()
    if folder is None:
        return
    for group in DATA_GROUPS:
        for path in sorted((folder / group).glob("**/*.yaml")):
            text = path.read_text(encoding="utf-8-sig")
            if any(line.strip().startswith("# @package") for line in text.splitlines()):
                raise AlignError(f"{path}: a {group} config may not set '# @package'; {group} files are data")
            try:
                doc = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise AlignError(f"{path}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
            bad = _code_key(doc)
            if bad:
                raise AlignError(f"{path}: key {bad!r} is not allowed in a {group} config (configs are data, "
                                 f"not code to run)")


def _code_key(node, top: bool = True) -> str | None:
    """The first key that would run code or reach outside the group: _target_, _call_, hydra, absolute defaults."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("_target_", "_call_", "_partial_") or (top and key == "hydra"):
                return str(key)
            if top and key == "defaults":
                for entry in value or []:
                    name = next(iter(entry), "") if isinstance(entry, dict) else str(entry)
                    if "/" in str(name) or "hydra" in str(name):
                        return f"defaults: {name}"
                continue
            found = _code_key(value, top=False)
            if found:
                return found
    elif isinstance(node, list):
        for item in node:
            found = _code_key(item, top=False)
            if found:
                return found
    return None
