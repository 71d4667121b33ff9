"""The ``WalListener`` spec as a pydantic model, built from the listener's own config model.

The spec mirrors ``config.yml`` section by section so a user who knows the listener knows the
resource; only secrets change shape: wherever the config holds a secret (``database.password``,
``publisher.password``, ``monitoring.sentryDSN``) the spec holds a reference to a Kubernetes Secret,
which reaches the pod as the ``WAL_*`` environment variable the listener already reads.

Nothing here re-declares a listener setting: ``spec.listener`` *is* :class:`ListenerConfig`,
``spec.logger`` *is* :class:`LoggerConfig`, ``spec.database`` and ``spec.monitoring`` extend the
listener's models, and the broker blocks under ``spec.publisher`` are cut out of
:class:`PublisherConfig` field by field (same types, defaults, limits and descriptions). The final
word is always the listener's :class:`Config`: :meth:`WalListenerSpec.to_config` builds one and
whatever it refuses is reported on the resource with the listener's own message.
"""

from __future__ import annotations

import copy
import re
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo

from listener.config import (
    Config,
    DatabaseConfig,
    ListenerConfig,
    LoggerConfig,
    MonitoringConfig,
    PublisherConfig,
    PublisherType,
    env_names,
)

API_GROUP = "wal-listener.io"
API_VERSION = "v1alpha1"
KIND = "WalListener"
PLURAL = "wallisteners"
SINGULAR = "wallistener"
SHORT_NAMES = ["wl", "wall"]

#: Where the rendered config is mounted in the listener pod.
CONFIG_DIR = "/etc/wal-listener"
CONFIG_FILE = "config.yml"
GOOGLE_CREDENTIALS_DIR = "/var/run/secrets/wal-listener/google"


class SpecError(ValueError):
    """The resource can never work as written; the message tells the user what to change."""


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class SecretKeyRef(_Spec):
    """One key of a Secret in the resource's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret (same namespace).")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret.")


class ReclaimPolicy(StrEnum):
    RETAIN = "Retain"
    DELETE = "Delete"


# --------------------------------------------------------------------------------------------------
# database and monitoring: the listener's models, with secrets as references


class DatabaseSpec(DatabaseConfig):
    """``database`` of config.yml; the password (and optionally the user) comes from a Secret."""

    user: str = Field("", description="Database user; or take it from userSecretRef.")
    user_secret_ref: SecretKeyRef | None = Field(None, description="Secret key holding the user name.")
    password_secret_ref: SecretKeyRef | None = Field(None, description="Secret key holding the password.")

    @model_validator(mode="after")
    def _no_inline_secrets(self) -> DatabaseSpec:
        if self.password.get_secret_value():
            raise ValueError("an inline password is not allowed; use database.passwordSecretRef")
        if bool(self.user) == bool(self.user_secret_ref):
            raise ValueError("set exactly one of database.user and database.userSecretRef")
        return self


class MonitoringSpec(MonitoringConfig):
    """``monitoring`` of config.yml; the Sentry DSN comes from a Secret."""

    sentry_dsn_secret_ref: SecretKeyRef | None = Field(
        None, alias="sentryDSNSecretRef", description="Secret key holding the Sentry DSN."
    )

    @model_validator(mode="after")
    def _no_inline_secrets(self) -> MonitoringSpec:
        if self.sentry_dsn.get_secret_value():
            raise ValueError("an inline sentryDSN is not allowed; use monitoring.sentryDSNSecretRef")
        return self

    @property
    def metrics_port(self) -> int | None:
        """The port of /metrics, or None when metrics are off."""
        if not self.prom_addr:
            return None
        return int(self.prom_addr.rsplit(":", 1)[1])


# --------------------------------------------------------------------------------------------------
# publisher: type + topic settings, and exactly one broker block cut out of PublisherConfig


def _subset(
    source: type[BaseModel],
    name: str,
    fields: list[str],
    *,
    defaults: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    doc: str = "",
) -> type[BaseModel]:
    """A model holding some fields of ``source``, with their own types, limits and aliases."""
    definitions: dict[str, Any] = {}
    for field_name in fields:
        info: FieldInfo = copy.copy(source.model_fields[field_name])
        if defaults and field_name in defaults:
            info = FieldInfo.merge_field_infos(info, default=defaults[field_name])
        definitions[field_name] = (info.annotation, info)
    definitions.update(extra or {})
    model = create_model(name, __base__=_Spec, __doc__=doc or None, **definitions)
    return model


_PASSWORD_REF = (SecretKeyRef | None, Field(None, description="Secret key holding the broker password."))
_COMMON_BROKER = ["address", "enable_tls", "username"]

if TYPE_CHECKING:  # generated below; to the type checker they are plain models
    NatsSpec: TypeAlias = BaseModel
    KafkaSpec: TypeAlias = BaseModel
    RabbitMQSpec: TypeAlias = BaseModel
    GooglePubSubSpec: TypeAlias = BaseModel
    _PublisherBase: TypeAlias = BaseModel
else:
    NatsSpec = _subset(
        PublisherConfig,
        "NatsSpec",
        [*_COMMON_BROKER, "duplicate_window"],
        extra={"password_secret_ref": _PASSWORD_REF},
        doc="NATS JetStream: the stream is publisher.topic.",
    )
    KafkaSpec = _subset(
        PublisherConfig,
        "KafkaSpec",
        [
            *_COMMON_BROKER,
            "sasl_mechanism",
            "compression",
            "linger_ms",
            "max_batch_bytes",
            "idempotent",
            "partitions",
            "replication_factor",
            "create_topics",
        ],
        extra={"password_secret_ref": _PASSWORD_REF},
        doc="Kafka: address is the bootstrap server list.",
    )
    RabbitMQSpec = _subset(
        PublisherConfig,
        "RabbitMQSpec",
        [*_COMMON_BROKER, "exchange_kind"],
        extra={"password_secret_ref": _PASSWORD_REF},
        doc="RabbitMQ: the exchange is publisher.topic; keep credentials out of the address.",
    )
    GooglePubSubSpec = _subset(
        PublisherConfig,
        "GooglePubSubSpec",
        ["address", "pub_sub_project_id", "enable_ordering", "create_topics"],
        defaults={"address": "pubsub.googleapis.com:443"},
        extra={
            "credentials_secret_ref": (
                SecretKeyRef | None,
                Field(None, description="Secret key holding a service-account JSON key (else workload identity)."),
            )
        },
        doc="Google Pub/Sub.",
    )
    _PublisherBase = _subset(PublisherConfig, "_PublisherBase", ["type", "topic", "topic_prefix", "message_key_from"])

#: publisher.type -> the name of the block that must be set for it
BROKER_BLOCKS: dict[PublisherType, str] = {
    PublisherType.NATS: "nats",
    PublisherType.KAFKA: "kafka",
    PublisherType.RABBITMQ: "rabbitmq",
    PublisherType.GOOGLE_PUBSUB: "googlePubSub",
}


class PublisherSpec(_PublisherBase):
    """``publisher`` of config.yml: type and topic settings, plus the one block of that broker."""

    nats: NatsSpec | None = None
    kafka: KafkaSpec | None = None
    rabbitmq: RabbitMQSpec | None = None
    google_pub_sub: GooglePubSubSpec | None = Field(None, alias="googlePubSub")

    @property
    def publisher_type(self) -> PublisherType:
        value: PublisherType = getattr(self, "type")  # noqa: B009 - declared on the generated base
        return value

    def broker(self) -> BaseModel:
        block: BaseModel | None = getattr(self, _FIELD_OF_BLOCK[BROKER_BLOCKS[self.publisher_type]])
        assert block is not None  # checked by _one_block
        return block

    @model_validator(mode="after")
    def _one_block(self) -> PublisherSpec:
        wanted = BROKER_BLOCKS[self.publisher_type]
        present = [alias for alias, field in _FIELD_OF_BLOCK.items() if getattr(self, field) is not None]
        if present != [wanted]:
            raise ValueError(
                f"publisher.type is {self.publisher_type.value}, so set publisher.{wanted} and no other "
                f"broker block (found: {', '.join(present) or 'none'})"
            )
        return self


_FIELD_OF_BLOCK = {"nats": "nats", "kafka": "kafka", "rabbitmq": "rabbitmq", "googlePubSub": "google_pub_sub"}


# --------------------------------------------------------------------------------------------------
# publication extras and the pod


class PublicationTable(_Spec):
    """A table of the publication with an optional row filter and column list (PostgreSQL 15+)."""

    name: str = Field(min_length=1, description="'schema.table', or 'table' for every schema that has it.")
    where: str = Field("", description="Row filter: a boolean SQL expression (PostgreSQL 15+).")
    columns: list[str] = Field(default_factory=list, description="Column list (PostgreSQL 15+).")


class PublicationSpec(_Spec):
    """Which tables the publication holds. Without tables: the tables of listener.filter, else all."""

    tables: list[PublicationTable] = Field(default_factory=list)


class PodSpec(_Spec):
    """How the listener pod runs."""

    image: str = Field("", description="Listener image; empty: the operator's default.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never", ""] = ""
    resources: dict[str, dict[str, str | int]] = Field(
        default_factory=dict, description="Container resources (requests, limits)."
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    service_account_name: str = ""
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")


class AlertSpec(_Spec):
    """When the operator raises a Warning event about a slot pinning WAL."""

    retained_wal_bytes: int = Field(
        1 << 30, ge=0, description="Warn when the slot holds back more WAL than this (bytes); 0: never."
    )


class WalListenerSpec(_Spec):
    """``spec`` of a WalListener."""

    listener: ListenerConfig
    publication: PublicationSpec = Field(default_factory=PublicationSpec)
    database: DatabaseSpec
    publisher: PublisherSpec
    logger: LoggerConfig = Field(default_factory=LoggerConfig)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    pod: PodSpec = Field(default_factory=PodSpec)
    alerts: AlertSpec = Field(default_factory=AlertSpec)
    reclaim_policy: ReclaimPolicy = Field(
        ReclaimPolicy.RETAIN, description="On delete: Retain keeps slot and publication, Delete drops them."
    )
    suspend: bool = Field(False, description="Scale the listener to zero; the slot keeps its position.")

    @model_validator(mode="after")
    def _probes_need_port(self) -> WalListenerSpec:
        if self.listener.server_port == 0:
            raise ValueError("listener.serverPort must not be 0: the pod's probes use /healthz and /ready")
        return self

    # ----------------------------------------------------------------------------------------------

    def secret_refs(self) -> dict[tuple[str, ...], SecretKeyRef]:
        """Config key path -> the Secret key that holds its value."""
        refs: dict[tuple[str, ...], SecretKeyRef] = {}
        if self.database.password_secret_ref:
            refs[("database", "password")] = self.database.password_secret_ref
        if self.database.user_secret_ref:
            refs[("database", "user")] = self.database.user_secret_ref
        ref = getattr(self.publisher.broker(), "password_secret_ref", None)
        if isinstance(ref, SecretKeyRef):
            refs[("publisher", "password")] = ref
        if self.monitoring.sentry_dsn_secret_ref:
            refs[("monitoring", "sentryDSN")] = self.monitoring.sentry_dsn_secret_ref
        return refs

    def env(self) -> list[dict[str, Any]]:
        """The container's env: every secret as its ``WAL_*`` variable, from the referenced Secret."""
        env: list[dict[str, Any]] = [
            {
                "name": env_names(path)[0],
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
            for path, ref in sorted(self.secret_refs().items())
        ]
        broker = self.publisher.broker()
        creds = getattr(broker, "credentials_secret_ref", None)
        if isinstance(creds, SecretKeyRef):
            env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{GOOGLE_CREDENTIALS_DIR}/{creds.key}"})
        return env

    def to_config(self, secrets: dict[tuple[str, ...], str] | None = None) -> Config:
        """The listener's config for this resource, validated by the listener's own model.

        ``secrets`` fills the secret keys (the operator does so to connect to the database itself);
        without it, placeholders stand in so the rest of the config can be checked.
        """
        values = secrets or {}
        publisher: dict[str, Any] = self.publisher.model_dump(
            mode="json", by_alias=True, include={"type", "topic", "topic_prefix", "message_key_from"}
        )
        block = self.publisher.broker().model_dump(
            mode="json", by_alias=True, exclude={"password_secret_ref", "credentials_secret_ref"}
        )
        publisher.update(block)
        database = self.database.model_dump(
            mode="json", by_alias=True, exclude={"password", "user_secret_ref", "password_secret_ref"}
        )
        if self.database.user_secret_ref:
            database["user"] = values.get(("database", "user"), "from-secret")
        if ("database", "password") in values:
            database["password"] = values[("database", "password")]
        if ("publisher", "password") in values:
            publisher["password"] = values[("publisher", "password")]
        monitoring: dict[str, Any] = {"promAddr": self.monitoring.prom_addr}
        if ("monitoring", "sentryDSN") in values:
            monitoring["sentryDSN"] = values[("monitoring", "sentryDSN")]
        data = {
            "listener": self.listener.model_dump(mode="json", by_alias=True),
            "database": database,
            "publisher": publisher,
            "logger": self.logger.model_dump(mode="json", by_alias=True),
            "monitoring": monitoring,
        }
        try:
            return Config.model_validate(data)
        except ValidationError as exc:
            raise SpecError(describe_validation_error(exc, prefix="spec")) from None

    def config_file(self) -> dict[str, Any]:
        """The config.yml the pod gets: no secrets, and no user when the user comes from a Secret."""
        data = self.to_config().to_yaml_dict()
        if self.database.user_secret_ref:
            data["database"].pop("user", None)
        return data


def describe_validation_error(exc: ValidationError, prefix: str = "spec") -> str:
    """One line per problem, naming the key as the user wrote it."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = str(err["msg"]).removeprefix("Value error, ")
        where = f"{prefix}.{loc}" if loc else prefix
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def parse_spec(spec: dict[str, Any]) -> WalListenerSpec:
    """Validate a resource's spec; :class:`SpecError` says what is wrong."""
    try:
        model = WalListenerSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError(describe_validation_error(exc)) from None
    model.to_config()  # the listener's model has the last word on every value
    return model


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def child_name(resource_name: str) -> str:
    """The name of the Deployment/ConfigMap/Service of a resource."""
    return f"{resource_name}-wal-listener"[:63].rstrip("-")
