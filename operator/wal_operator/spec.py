"""The ``WalListener`` spec as a pydantic model, built from the listener's own config model.

The spec mirrors ``config.yml`` section by section so a user who knows the listener knows the
resource; only secrets change shape: wherever the config holds a secret (``database.password``,
``publisher.password``, ``monitoring.sentryDSN``, ``listener.transformsHashKey``) the spec holds a
reference to a Kubernetes Secret, which reaches the pod as the ``WAL_*`` environment variable the
listener already reads, and TLS files come from Secrets mounted into the pod.

Nothing here re-declares a listener setting: ``spec.logger`` *is* :class:`LoggerConfig`,
``spec.listener``, ``spec.database`` and ``spec.monitoring`` extend the listener's models, and
``spec.publisher`` extends the listener's :class:`PublisherSettings` with one block per broker, each
the listener's settings class of that broker (:class:`NatsSettings`, ...) plus the Secret references. The final
word is always the listener's :class:`Config`: :meth:`WalListenerSpec.to_config` builds one and
whatever it refuses is reported on the resource with the listener's own message.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import SkipJsonSchema

from listener.catalog import (
    IDENTIFIER_PATTERN,
    MAX_EXPRESSION_LENGTH,
    PUBLICATION_NAME_PATTERN,
    TABLE_NAME_PATTERN,
    ExpressionError,
    check_expression,
    is_table_name,
)
from listener.config import (
    Config,
    DatabaseConfig,
    GooglePubSubSettings,
    KafkaSettings,
    ListenerConfig,
    LoggerConfig,
    MonitoringConfig,
    NatsSettings,
    PublisherSettings,
    PublisherType,
    RabbitMQSettings,
    env_names,
)
from wal_operator.sizing import max_in_flight_bytes, memory_limit, pod_resources, resources_problem

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
#: TLS files from Secrets are mounted under TLS_DIR/<database|publisher>/ with these names
TLS_DIR = "/var/run/secrets/wal-listener/tls"
TLS_FILES = {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"}


class SpecError(ValueError):
    """The resource can never work as written; the message tells the user what to change (``problems``:
    the same, one entry per problem)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class SecretKeyRef(_Spec):
    """One key of a Secret in the resource's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret (same namespace).")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret.")


#: config keys of the TLS files, by role
_DB_TLS_KEYS = {"ca": "sslRootCert", "cert": "sslCert", "key": "sslKey"}
_BROKER_TLS_KEYS = {"ca": "caCert", "cert": "clientCert", "key": "clientKey"}


class TLSSpec(_Spec):
    """TLS material from Secrets, mounted read-only into the listener pod."""

    ca_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the CA certificate(s) that verify the server."
    )
    cert_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the client certificate (with keySecretRef)."
    )
    key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the client certificate's private key (with certSecretRef)."
    )

    @model_validator(mode="after")
    def _pairs(self) -> TLSSpec:
        if (self.cert_secret_ref is None) != (self.key_secret_ref is None):
            raise ValueError("set certSecretRef and keySecretRef together (a client certificate needs its key)")
        if self.ca_secret_ref is None and self.cert_secret_ref is None:
            raise ValueError("set caSecretRef, or certSecretRef with keySecretRef")
        return self

    def refs(self) -> dict[str, SecretKeyRef]:
        """File role (``ca``, ``cert``, ``key``) -> the Secret key holding it."""
        found = {"ca": self.ca_secret_ref, "cert": self.cert_secret_ref, "key": self.key_secret_ref}
        return {role: ref for role, ref in found.items() if ref is not None}


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
    tls: TLSSpec | None = Field(
        None, description="CA and client certificate for TLS to PostgreSQL (use with sslMode verify-full)."
    )
    # file paths inside the pod: the operator sets them from ``tls``
    ssl_root_cert: SkipJsonSchema[str] = ""
    ssl_cert: SkipJsonSchema[str] = ""
    ssl_key: SkipJsonSchema[str] = ""

    @model_validator(mode="after")
    def _no_inline_secrets(self) -> DatabaseSpec:
        if self.password.get_secret_value():
            raise ValueError("an inline password is not allowed; use database.passwordSecretRef")
        if bool(self.user) == bool(self.user_secret_ref):
            raise ValueError("set exactly one of database.user and database.userSecretRef")
        if self.ssl_root_cert or self.ssl_cert or self.ssl_key:
            raise ValueError("sslRootCert/sslCert/sslKey are files inside the pod; use database.tls with Secret refs")
        return self


class ListenerSpec(ListenerConfig):
    """``listener`` of config.yml; the transforms' hash key comes from a Secret."""

    transforms_hash_key_secret_ref: SecretKeyRef | None = Field(
        None,
        description="Secret key holding listener.transformsHashKey (the HMAC key of hash masks, 16+ characters); "
        "rotating it rolls the pod and changes every hash from then on.",
    )
    _HASH_KEY_HOW: ClassVar[str] = "set listener.transformsHashKeySecretRef to a Secret key holding"

    def _has_hash_key(self) -> bool:  # an inline one is refused by _no_inline_secrets
        return self.transforms_hash_key_secret_ref is not None or super()._has_hash_key()

    @model_validator(mode="after")
    def _no_inline_secrets(self) -> ListenerSpec:
        if self.transforms_hash_key.get_secret_value():
            raise ValueError("an inline transformsHashKey is not allowed; use listener.transformsHashKeySecretRef")
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
# publisher: type + topic settings, and exactly one broker block: the listener's broker settings with
# the secrets (password, TLS files, Google key) as Secret references


_PASSWORD_REF = Field(None, description="Secret key holding the broker password.")
_TLS = Field(None, description="CA and client certificate for TLS to the broker (turns TLS on).")


class NatsSpec(_Spec, NatsSettings):
    """NATS JetStream: the stream is publisher.topic."""

    password_secret_ref: SecretKeyRef | None = _PASSWORD_REF
    tls: TLSSpec | None = _TLS


class KafkaSpec(_Spec, KafkaSettings):
    """Kafka: address is the bootstrap server list."""

    password_secret_ref: SecretKeyRef | None = _PASSWORD_REF
    tls: TLSSpec | None = _TLS


class RabbitMQSpec(_Spec, RabbitMQSettings):
    """RabbitMQ: the exchange is publisher.topic; keep credentials out of the address."""

    password_secret_ref: SecretKeyRef | None = _PASSWORD_REF
    tls: TLSSpec | None = _TLS


class GooglePubSubSpec(_Spec, GooglePubSubSettings):
    """Google Pub/Sub."""

    credentials_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a service-account JSON key (else workload identity)."
    )


#: publisher.type -> the name of the block that must be set for it
BROKER_BLOCKS: dict[PublisherType, str] = {
    PublisherType.NATS: "nats",
    PublisherType.KAFKA: "kafka",
    PublisherType.RABBITMQ: "rabbitmq",
    PublisherType.GOOGLE_PUBSUB: "googlePubSub",
}
_FIELD_OF_BLOCK = {"nats": "nats", "kafka": "kafka", "rabbitmq": "rabbitmq", "googlePubSub": "google_pub_sub"}
BrokerSpec = NatsSpec | KafkaSpec | RabbitMQSpec | GooglePubSubSpec


class PublisherSpec(_Spec, PublisherSettings):
    """``publisher`` of config.yml: type and topic settings, plus the one block of that broker."""

    nats: NatsSpec | None = Field(None, description="Settings when type is nats.")
    kafka: KafkaSpec | None = Field(None, description="Settings when type is kafka.")
    rabbitmq: RabbitMQSpec | None = Field(None, description="Settings when type is rabbitmq.")
    google_pub_sub: GooglePubSubSpec | None = Field(
        None, alias="googlePubSub", description="Settings when type is google_pubsub."
    )

    def broker(self) -> BrokerSpec:
        block: BrokerSpec | None = getattr(self, _FIELD_OF_BLOCK[BROKER_BLOCKS[self.type]])
        assert block is not None  # checked by _one_block
        return block

    @model_validator(mode="after")
    def _one_block(self) -> PublisherSpec:
        wanted = BROKER_BLOCKS[self.type]
        present = [alias for alias, field in _FIELD_OF_BLOCK.items() if getattr(self, field) is not None]
        if present != [wanted]:
            raise ValueError(
                f"publisher.type is {self.type.value}, so set publisher.{wanted} and no other "
                f"broker block (found: {', '.join(present) or 'none'})"
            )
        return self


# --------------------------------------------------------------------------------------------------
# publication extras and the pod


_TABLE_NAME_HELP = (
    "'table' or 'schema.table' of plain identifiers (letters, digits, _ and $, not starting with a digit)"
)


def _table_name(value: Any) -> Any:
    if isinstance(value, str) and not is_table_name(value):
        raise ValueError(f"{value!r} is not a table name: use {_TABLE_NAME_HELP}")
    return value


def _expression(value: Any, what: str) -> Any:
    if isinstance(value, str) and value:
        try:
            check_expression(value)
        except ExpressionError as exc:
            raise ValueError(f"{what} {exc}") from None
    return value


_WHERE_PATTERN = r"^[^;$\\]*$"


class PublicationTable(_Spec):
    """A table of the publication with an optional row filter and column list (PostgreSQL 15+)."""

    name: str = Field(
        pattern=TABLE_NAME_PATTERN,
        max_length=127,
        description="'schema.table', or 'table' for every schema that has it (plain identifiers only).",
    )
    where: str = Field(
        "",
        max_length=MAX_EXPRESSION_LENGTH,
        pattern=_WHERE_PATTERN,
        description="Row filter: one boolean SQL expression over the table's columns (PostgreSQL 15+); "
        "no ';', comments, '$' or backslashes.",
    )
    columns: list[Annotated[str, Field(pattern=f"^{IDENTIFIER_PATTERN}$")]] = Field(
        default_factory=list, max_length=1600, description="Column list (PostgreSQL 15+): plain identifiers."
    )

    @field_validator("name", mode="before")
    @classmethod
    def _check_name(cls, value: Any) -> Any:
        return _table_name(value)

    @field_validator("where", mode="before")
    @classmethod
    def _check_where(cls, value: Any) -> Any:
        return _expression(value, "the row filter")


class PublicationSpec(_Spec):
    """Which tables the publication holds. Without tables: the tables of listener.filter, else all."""

    tables: list[PublicationTable] = Field(
        default_factory=list, max_length=1000, description="Tables with row filters and column lists."
    )


class PodSpec(_Spec):
    """How the listener pod runs."""

    image: str = Field("", description="Listener image; empty: the operator's default.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never", ""] = Field(
        "", description="Image pull policy of the listener container; empty: Kubernetes' default."
    )
    resources: dict[str, dict[str, str | int]] = Field(
        default_factory=dict,
        description="Container resources (requests, limits), each key over the defaults: requests cpu 100m and "
        "memory 256Mi, limits memory 512Mi. listener.maxInFlightBytes, when not set, is derived from "
        "limits.memory: a quarter of what it leaves above 96Mi (104Mi for 512Mi).",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod must run on.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations, as in a Pod.")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Pod affinity, as in a Pod.")
    service_account_name: str = Field(
        "", description="Service account of the pod; empty: none mounted (the listener needs no API access)."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, value: dict[str, dict[str, str | int]]) -> dict[str, dict[str, str | int]]:
        problem = resources_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    def container_resources(self) -> dict[str, dict[str, str | int]]:
        """The listener container's resources: the defaults with the keys of ``resources`` over them."""
        return pod_resources(self.resources)


class AlertSpec(_Spec):
    """When the operator raises a Warning event about a slot pinning WAL."""

    retained_wal_bytes: int = Field(
        1 << 30, ge=0, description="Warn when the slot holds back more WAL than this (bytes); 0: never."
    )


class BackfillSpec(_Spec):
    """A backfill: the rows the tables have now, published as READ events (runs once per name)."""

    name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="Unique name of this backfill; a new name starts a new one, a name is never run twice.",
    )
    tables: list[Annotated[str, Field(pattern=TABLE_NAME_PATTERN, max_length=127)]] = Field(
        min_length=1, max_length=1000, description="'table' (every schema) or 'schema.table', published tables only."
    )
    where: str = Field(
        "",
        max_length=MAX_EXPRESSION_LENGTH,
        pattern=_WHERE_PATTERN,
        description="Only rows matching one boolean SQL expression; no ';', comments, '$' or backslashes.",
    )

    @field_validator("tables", mode="before")
    @classmethod
    def _check_tables(cls, value: Any) -> Any:
        return [_table_name(v) for v in value] if isinstance(value, list) else value

    @field_validator("where", mode="before")
    @classmethod
    def _check_where(cls, value: Any) -> Any:
        return _expression(value, "the backfill filter")


class WalListenerSpec(_Spec):
    """``spec`` of a WalListener."""

    listener: ListenerSpec = Field(
        description="The listener section of config.yml: slot, filter, topics, transforms."
    )
    publication: PublicationSpec = Field(
        default_factory=PublicationSpec, description="Row filters and column lists of the publication."
    )
    database: DatabaseSpec = Field(description="The PostgreSQL database to stream from.")
    publisher: PublisherSpec = Field(description="The broker to publish to.")
    logger: LoggerConfig = Field(default_factory=LoggerConfig, description="Log level and format of the listener.")
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec, description="Metrics and Sentry.")
    pod: PodSpec = Field(default_factory=PodSpec, description="How the listener pod runs.")
    alerts: AlertSpec = Field(default_factory=AlertSpec, description="Warning events the operator posts.")
    reclaim_policy: ReclaimPolicy = Field(
        ReclaimPolicy.RETAIN, description="On delete: Retain keeps slot and publication, Delete drops them."
    )
    suspend: bool = Field(False, description="Scale the listener to zero; the slot keeps its position.")
    backfills: list[BackfillSpec] = Field(
        default_factory=list,
        max_length=100,
        description="On-demand backfills: each new entry runs once (progress in status.backfills).",
    )

    @model_validator(mode="after")
    def _backfill_names_unique(self) -> WalListenerSpec:
        names = [b.name for b in self.backfills]
        if len(names) != len(set(names)):
            raise ValueError("backfills: every entry needs its own name")
        return self

    @model_validator(mode="after")
    def _probes_need_port(self) -> WalListenerSpec:
        if self.listener.server_port == 0:
            raise ValueError("listener.serverPort must not be 0: the pod's probes use /healthz and /ready")
        return self

    @model_validator(mode="after")
    def _metrics_port_of_its_own(self) -> WalListenerSpec:
        if self.monitoring.metrics_port == self.listener.server_port:
            raise ValueError(
                "monitoring.promAddr: use a port other than listener.serverPort, so the pod has a port named "
                "metrics for the PodMonitor/ServiceMonitor to scrape"
            )
        return self

    @model_validator(mode="after")
    def _publication_name_is_plain(self) -> WalListenerSpec:
        if not re.fullmatch(PUBLICATION_NAME_PATTERN, self.listener.publication_name):
            raise ValueError(
                "listener.publicationName: must be 1-63 letters, digits, '_' and '-' (not starting with '-')"
            )
        return self

    @model_validator(mode="after")
    def _filter_tables_are_names(self) -> WalListenerSpec:
        # the operator turns these keys into the publication's tables
        for key in self.listener.filter.tables or {}:
            if not is_table_name(key):
                raise ValueError(f"listener.filter.tables: {key!r} is not a table name: use {_TABLE_NAME_HELP}")
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
        if ref is not None:
            refs[("publisher", "password")] = ref
        if self.listener.transforms_hash_key_secret_ref:
            refs[("listener", "transformsHashKey")] = self.listener.transforms_hash_key_secret_ref
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

    def tls(self) -> dict[str, TLSSpec]:
        """``database`` and/or ``publisher`` -> its TLS material, where the spec gives some."""
        found: dict[str, TLSSpec] = {}
        if self.database.tls is not None:
            found["database"] = self.database.tls
        broker_tls = getattr(self.publisher.broker(), "tls", None)
        if isinstance(broker_tls, TLSSpec):
            found["publisher"] = broker_tls
        return found

    def referenced_secrets(self) -> dict[str, SecretKeyRef]:
        """Every Secret key the listener uses (values, TLS files, credentials), by its spec field."""
        refs = {f"{'.'.join(path)}SecretRef": ref for path, ref in self.secret_refs().items()}
        if ("publisher", "password") in self.secret_refs():
            refs[f"publisher.{self.publisher_block}.passwordSecretRef"] = refs.pop("publisher.passwordSecretRef")
        for target, tls in self.tls().items():
            where = "database" if target == "database" else f"publisher.{self.publisher_block}"
            refs.update({f"{where}.tls.{role}SecretRef": ref for role, ref in tls.refs().items()})
        creds = getattr(self.publisher.broker(), "credentials_secret_ref", None)
        if isinstance(creds, SecretKeyRef):
            refs[f"publisher.{self.publisher_block}.credentialsSecretRef"] = creds
        return refs

    @property
    def publisher_block(self) -> str:
        """The name of the broker block in use (``nats``, ``kafka``, ``rabbitmq``, ``googlePubSub``)."""
        return BROKER_BLOCKS[self.publisher.type]

    def to_config(self, secrets: dict[tuple[str, ...], str] | None = None, tls_dir: str = TLS_DIR) -> Config:
        """The listener's config for this resource, validated by the listener's own model.

        ``secrets`` fills the secret keys (the operator does so to connect to the database itself);
        without it, placeholders stand in so the rest of the config can be checked. TLS files are
        named as they are mounted under ``tls_dir`` (the operator's own connection uses a private copy).
        """
        values = secrets or {}
        publisher: dict[str, Any] = self.publisher.model_dump(
            mode="json", by_alias=True, include=set(PublisherSettings.model_fields)  # what every broker shares
        )
        block = self.publisher.broker().model_dump(
            mode="json", by_alias=True, exclude={"password_secret_ref", "credentials_secret_ref"}
        )
        publisher.update(block)
        database = self.database.model_dump(
            mode="json",
            by_alias=True,
            exclude={"password", "user_secret_ref", "password_secret_ref", "ssl_root_cert", "ssl_cert", "ssl_key"},
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
        for target, tls in self.tls().items():
            section, keys = (database, _DB_TLS_KEYS) if target == "database" else (publisher, _BROKER_TLS_KEYS)
            section.pop("tls", None)
            for role in tls.refs():
                section[keys[role]] = f"{tls_dir}/{target}/{TLS_FILES[role]}"
            if target == "publisher":
                publisher["enableTLS"] = True
        database.pop("tls", None)
        publisher.pop("tls", None)
        listener = self.listener.model_dump(mode="json", by_alias=True, exclude={"transforms_hash_key_secret_ref"})
        if "max_in_flight_bytes" not in self.listener.model_fields_set:  # sized to the pod (wal_operator.sizing)
            listener["maxInFlightBytes"] = max_in_flight_bytes(memory_limit(self.pod.container_resources()))
        if self.listener.transforms_hash_key_secret_ref:
            listener["transformsHashKey"] = values.get(("listener", "transformsHashKey"), _HASH_KEY_PLACEHOLDER)
        data = {
            "listener": listener,
            "database": database,
            "publisher": publisher,
            "logger": self.logger.model_dump(mode="json", by_alias=True),
            "monitoring": monitoring,
        }
        try:
            return Config.model_validate(data)
        except ValidationError as exc:
            problems = validation_problems(exc)
            raise SpecError("; ".join(problems), problems) from None

    def config_file(self) -> dict[str, Any]:
        """The config.yml the pod gets: no secrets, and no user when the user comes from a Secret."""
        data = self.to_config().to_yaml_dict()
        if self.database.user_secret_ref:
            data["database"].pop("user", None)
        return data


#: stands in for the Secret-held hash key when the config is only checked or rendered (never written out)
_HASH_KEY_PLACEHOLDER = "placeholder-for-the-secret-hash-key"

_KEY_FIRST = re.compile(r"[a-z][A-Za-z0-9]*(\.[a-z][A-Za-z0-9]*)*: ")


def validation_problems(exc: ValidationError, prefix: str = "spec") -> list[str]:
    """One entry per problem, naming the key as the user wrote it."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = str(err["msg"]).removeprefix("Value error, ")
        if loc:
            lines.append(f"{prefix}.{loc}: {msg}")
        elif _KEY_FIRST.match(msg):  # a rule over several keys names the key it refuses first
            lines.append(f"{prefix}.{msg}")
        else:
            lines.append(f"{prefix}: {msg}")
    return lines


def parse_spec(spec: dict[str, Any]) -> WalListenerSpec:
    """Validate a resource's spec; :class:`SpecError` says what is wrong."""
    try:
        model = WalListenerSpec.model_validate(spec)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise SpecError("; ".join(problems), problems) from None
    model.to_config()  # the listener's model has the last word on every value
    return model

