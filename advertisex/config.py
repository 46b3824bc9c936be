"""Configuration: package defaults overlaid by one YAML file per environment.

Every key a conf file may set exists in ``defaults.yaml``; anything else is a typo and stops the
job with a one-line message, before Spark starts.
"""
from __future__ import annotations

import copy
import datetime as dt
import os
import pkgutil
import re
from dataclasses import dataclass
from typing import Any

import yaml

FEEDS = ("impressions", "clicks_conversions", "bid_requests")

# Sections whose keys are free-form (names chosen by the user), so they are not checked against
# the defaults key by key.
_OPEN_SECTIONS = {"spark.extra", "kafka.options", "kafka.producer_options", "streaming.feed_trigger_intervals"}
_RULE_SECTIONS = {f"validation.rules.{feed}" for feed in FEEDS}
_INTERVAL = re.compile(r"^\d+\s+(second|minute|hour|day)s?$")
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def parse_interval(text: str) -> dt.timedelta:
    """'30 minutes' -> timedelta; the interval strings conf uses (and Spark's INTERVAL accepts)."""
    match = _INTERVAL.match(str(text).strip())
    if not match:
        raise ConfigError(f"not an interval like '10 seconds': {text!r}")
    number = int(str(text).split()[0])
    return dt.timedelta(seconds=number * _UNIT_SECONDS[match.group(1)])


class ConfigError(ValueError):
    """A bad conf file, conf key, argument or missing secret; the message is one line."""


def _defaults() -> dict:
    raw = pkgutil.get_data("advertisex", "defaults.yaml")
    return yaml.safe_load(raw)


def _merge(base: dict, override: dict, path: str = "") -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}.{key}" if path else str(key)
        if path in _RULE_SECTIONS and value is None:
            merged.pop(key, None)  # a rule set to null is switched off
            continue
        if path in _OPEN_SECTIONS or path in _RULE_SECTIONS:
            merged[key] = value
            continue
        if key not in base:
            raise ConfigError(f"unknown conf key '{where}'")
        if isinstance(base[key], dict) and value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"conf key '{where}' must be a mapping, got {type(value).__name__}")
            merged[key] = _merge(base[key], value, where)
        else:
            merged[key] = value
    return merged


def _check(conf: dict) -> None:
    if conf["source"] not in ("files", "kafka"):
        raise ConfigError(f"conf key 'source' must be 'files' or 'kafka', got {conf['source']!r}")
    if conf["spark"]["state_store_provider"] not in ("hdfs", "rocksdb"):
        raise ConfigError("conf key 'spark.state_store_provider' must be 'hdfs' or 'rocksdb'")
    for key in ("spark.shuffle_partitions", "files.max_files_per_trigger", "kafka.max_offsets_per_trigger",
                "correlation.max_files_per_trigger"):
        section, name = key.split(".")
        value = conf[section][name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"conf key '{key}' must be a positive integer, got {value!r}")
    feed_intervals = conf["streaming"]["feed_trigger_intervals"] or {}
    if not isinstance(feed_intervals, dict) or not set(feed_intervals) <= set(FEEDS):
        raise ConfigError(f"conf key 'streaming.feed_trigger_intervals' must map feeds ({', '.join(FEEDS)}) "
                          f"to intervals, got {feed_intervals!r}")
    intervals = {f"streaming.feed_trigger_intervals.{k}": v for k, v in feed_intervals.items()}
    intervals |= {"streaming.trigger_interval": conf["streaming"]["trigger_interval"],
                 "validation.max_future_skew": conf["validation"]["max_future_skew"],
                 "correlation.watermark": conf["correlation"]["watermark"]}
    intervals.update({f"correlation.windows.{k}": v for k, v in conf["correlation"]["windows"].items()})
    for key, value in intervals.items():
        if not _INTERVAL.match(str(value)):
            raise ConfigError(f"conf key '{key}' must look like '10 seconds', got {value!r}")
    if conf["silver"]["dedup_scope"] not in ("table", "batch_event_times"):
        raise ConfigError(f"conf key 'silver.dedup_scope' must be 'table' or 'batch_event_times', "
                          f"got {conf['silver']['dedup_scope']!r}")
    auto_compact = conf["maintenance"]["auto_compact"]
    if not isinstance(auto_compact, bool):
        raise ConfigError(f"conf key 'maintenance.auto_compact' must be true or false, got {auto_compact!r}")
    port = conf["monitoring"]["prometheus_port"]
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
        raise ConfigError(f"conf key 'monitoring.prometheus_port' must be a port number or null, got {port!r}")
    for number, hook in enumerate(conf["monitoring"]["alerting"]["webhooks"] or []):
        if not isinstance(hook, dict) or not isinstance(hook.get("url"), str) or hook.get("format") not in (
                "slack", "alertmanager"):
            raise ConfigError(f"conf key 'monitoring.alerting.webhooks[{number}]' must be {{url: ..., format: "
                              f"slack|alertmanager}}, got {hook!r}")
    for name, value in conf["monitoring"]["detectors"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"conf key 'monitoring.detectors.{name}' must be a non-negative number, got {value!r}")
    kafka = conf["kafka"]
    if set(kafka["topics"]) != set(FEEDS) or not all(isinstance(t, str) and t for t in kafka["topics"].values()):
        raise ConfigError(f"conf key 'kafka.topics' must name a topic for each of {', '.join(FEEDS)}")
    if kafka["starting_offsets"] not in ("earliest", "latest"):
        raise ConfigError(f"conf key 'kafka.starting_offsets' must be 'earliest' or 'latest', got {kafka['starting_offsets']!r}")
    ids = kafka["schema_registry_ids"]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in ids):
        raise ConfigError(f"conf key 'kafka.schema_registry_ids' must be a list of schema ids, got {ids!r}")
    for section in ("options", "producer_options"):
        for name, value in (kafka[section] or {}).items():
            if not isinstance(value, (str, int, float, bool)):
                raise ConfigError(f"conf key 'kafka.{section}.{name}' must be a single value")
    for feed in FEEDS:
        rules = conf["validation"]["rules"].get(feed) or {}
        if "malformed_record" not in rules:
            raise ConfigError(f"conf key 'validation.rules.{feed}' must define malformed_record")
        for name, condition in rules.items():
            if not isinstance(condition, str) or not condition.strip():
                raise ConfigError(f"conf key 'validation.rules.{feed}.{name}' must be a SQL condition string")


@dataclass(frozen=True)
class Settings:
    """The merged conf plus the paths given on the command line."""

    conf: dict

    @property
    def landing(self) -> str:
        return self.conf["landing"]

    @property
    def lake(self) -> str:
        return self.conf["lake"]

    @property
    def checkpoints(self) -> str:
        return self.conf["checkpoints"] or f"{self.lake.rstrip('/')}/_checkpoints"

    def table(self, name: str) -> str:
        """Path of a lake table, e.g. ``table('silver/impressions')``."""
        return f"{self.lake.rstrip('/')}/{name}"

    def feed_dir(self, feed: str) -> str:
        return f"{self.landing.rstrip('/')}/{feed}"

    @property
    def dims_dir(self) -> str:
        return f"{self.landing.rstrip('/')}/dims/creatives"


def load_conf(path: str | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read ``path`` over the defaults; ``overrides`` are top-level keys from the command line."""
    user: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"conf file not found: {path}")
        try:
            with open(path, encoding="utf-8") as fh:
                user = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"conf file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"conf file {path} must hold a mapping at the top level")
    conf = _merge(_defaults(), user)
    for key, value in (overrides or {}).items():
        if value is not None:
            conf[key] = value
    _check(conf)
    return Settings(conf)


def pseudonymization_key(settings: Settings) -> bytes:
    """The HMAC key for user ids, from the environment variable the conf names."""
    env = settings.conf["privacy"]["pseudonymization_key_env"]
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"environment variable {env} is not set (the secret key for user_key)")
    return value.encode("utf-8")



_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve_secrets(options: dict, where: str) -> dict[str, str]:
    """Client options with every ``${ENV_VAR}`` replaced from the environment.

    Secrets stay out of conf files this way; the resolved values are handed to the client and
    never logged. A variable that is not set stops the job with a message naming it (not its value).
    """
    resolved = {}
    for name, value in (options or {}).items():
        text = str(value).lower() if isinstance(value, bool) else str(value)

        def lookup(match: re.Match, name=name) -> str:
            env = match.group(1)
            if env not in os.environ:
                raise ConfigError(f"environment variable {env} is not set (named by conf key '{where}.{name}')")
            return os.environ[env]

        resolved[str(name)] = _ENV_REFERENCE.sub(lookup, text)
    return resolved
