"""The one schema every store shares, as numbered migrations.

Each migration is written once with ``{blob}`` standing for the binary column type, so SQLite
and PostgreSQL run the same statements. A database records the highest migration applied in
``schema_version``; a gateway upgrades an older database and refuses a newer one.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE predictions (
            prediction_id TEXT PRIMARY KEY,
            request_id TEXT,
            route TEXT NOT NULL,
            variant TEXT NOT NULL,
            model_name TEXT,
            configured_version TEXT NOT NULL,
            reported_version TEXT,
            assignment TEXT NOT NULL,
            routing_key TEXT,
            config_version TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            request_time DOUBLE PRECISION NOT NULL,
            response_time DOUBLE PRECISION NOT NULL,
            latency_ms DOUBLE PRECISION NOT NULL,
            status INTEGER NOT NULL,
            error TEXT,
            request_body {blob},
            response_body {blob},
            request_truncated INTEGER NOT NULL DEFAULT 0,
            response_truncated INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX predictions_request_id ON predictions (request_id)",
        "CREATE INDEX predictions_route_time ON predictions (route, request_time)",
        "CREATE INDEX predictions_variant_time ON predictions (variant, request_time)",
        """CREATE TABLE configs (
            version TEXT NOT NULL,
            activated_at DOUBLE PRECISION NOT NULL,
            source TEXT NOT NULL,
            text TEXT NOT NULL
        )""",
        "CREATE INDEX configs_activated_at ON configs (activated_at)",
    ),
    (
        "ALTER TABLE predictions ADD COLUMN request_headers TEXT",
        "ALTER TABLE predictions ADD COLUMN response_headers TEXT",
        "ALTER TABLE predictions ADD COLUMN shadow INTEGER NOT NULL DEFAULT 0",
    ),
    (
        # the prediction as JSON text (a label or a value) and its score, for evaluation
        "ALTER TABLE predictions ADD COLUMN predicted TEXT",
        "ALTER TABLE predictions ADD COLUMN score DOUBLE PRECISION",
        """CREATE TABLE feedback (
            feedback_id TEXT PRIMARY KEY,
            prediction_id TEXT,
            request_id TEXT,
            label TEXT NOT NULL,
            label_time DOUBLE PRECISION NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            source TEXT,
            joined_prediction_id TEXT,
            joined_at DOUBLE PRECISION
        )""",
        "CREATE INDEX feedback_prediction_id ON feedback (prediction_id)",
        "CREATE INDEX feedback_request_id ON feedback (request_id)",
        "CREATE INDEX feedback_joined ON feedback (joined_prediction_id)",
        "CREATE INDEX feedback_pending ON feedback (joined_at)",
    ),
    (
        # a shadow's record names the live prediction it copied, to compare the two
        "ALTER TABLE predictions ADD COLUMN shadow_of TEXT",
        "CREATE INDEX predictions_shadow_of ON predictions (shadow_of)",
    ),
    (
        # 1 when some text of the record held NUL or an unpaired surrogate, kept escaped
        "ALTER TABLE predictions ADD COLUMN escaped INTEGER NOT NULL DEFAULT 0",
        # 0 for a call that asks for no prediction (GET, HEAD: readiness, metadata)
        "ALTER TABLE predictions ADD COLUMN inference INTEGER NOT NULL DEFAULT 1",
        # records the store refused for what they hold, each alone, with the store's reason:
        # kept aside rather than retried, so that one bad value cannot hold back the log
        """CREATE TABLE dead_letters (
            dead_letter_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            prediction_id TEXT,
            failed_at DOUBLE PRECISION NOT NULL,
            error TEXT NOT NULL,
            record TEXT NOT NULL
        )""",
        "CREATE INDEX dead_letters_failed_at ON dead_letters (failed_at)",
    ),
    (
        # streams: the first byte apart from the whole; OpenAI-style answers: model, usage
        "ALTER TABLE predictions ADD COLUMN first_byte_ms DOUBLE PRECISION",
        "ALTER TABLE predictions ADD COLUMN streamed INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE predictions ADD COLUMN served_model TEXT",
        "ALTER TABLE predictions ADD COLUMN prompt_tokens INTEGER",
        "ALTER TABLE predictions ADD COLUMN completion_tokens INTEGER",
    ),
    (
        # a batch request is a record of its own, and each of its rows a prediction of its own
        "ALTER TABLE predictions ADD COLUMN batch_of TEXT",
        "ALTER TABLE predictions ADD COLUMN batch_size INTEGER",
    ),
    (
        # each rollout's state, and which gateway decides for it until when (its lease)
        """CREATE TABLE rollouts (
            id TEXT PRIMARY KEY,
            route TEXT NOT NULL,
            status TEXT NOT NULL,
            step INTEGER NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            step_started_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            reason TEXT NOT NULL,
            holder TEXT,
            lease_until DOUBLE PRECISION NOT NULL DEFAULT 0
        )""",
    ),
    (
        # a request's monitored features, and the references they are compared with
        "ALTER TABLE predictions ADD COLUMN features TEXT",
        """CREATE TABLE drift_references (
            reference_id TEXT PRIMARY KEY,
            route TEXT NOT NULL,
            variant TEXT NOT NULL,
            model_version TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            source TEXT NOT NULL,
            body TEXT NOT NULL
        )""",
        "CREATE INDEX drift_references_route ON drift_references (route, created_at)",
    ),
    (
        # feedback: where a label came from (downstream, human, import), a hand label's
        # inclusion probability in its sample, and a human's decision on a recommendation
        # (outcome, value), which may come without a label: the table is rebuilt, since
        # SQLite cannot drop a NOT NULL constraint
        """CREATE TABLE feedback_v10 (
            feedback_id TEXT PRIMARY KEY,
            prediction_id TEXT,
            request_id TEXT,
            label TEXT,
            label_time DOUBLE PRECISION NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            source TEXT,
            joined_prediction_id TEXT,
            joined_at DOUBLE PRECISION,
            origin TEXT NOT NULL DEFAULT 'downstream',
            inclusion_probability DOUBLE PRECISION,
            outcome TEXT,
            value DOUBLE PRECISION
        )""",
        """INSERT INTO feedback_v10 (feedback_id, prediction_id, request_id, label, label_time,
            received_at, source, joined_prediction_id, joined_at)
        SELECT feedback_id, prediction_id, request_id, label, label_time, received_at, source,
            joined_prediction_id, joined_at FROM feedback""",
        "DROP TABLE feedback",
        "ALTER TABLE feedback_v10 RENAME TO feedback",
        "CREATE INDEX feedback_prediction_id ON feedback (prediction_id)",
        "CREATE INDEX feedback_request_id ON feedback (request_id)",
        "CREATE INDEX feedback_joined ON feedback (joined_prediction_id)",
        "CREATE INDEX feedback_pending ON feedback (joined_at)",
        # deliveries: each file a delivery wrote (its number), which predictions it holds,
        # claimed in one transaction before the file is written, so that a file lost to a
        # crash is written again from its claim, and nothing is delivered twice; and which
        # process writes it until when (its lease)
        """CREATE TABLE deliveries (
            delivery TEXT NOT NULL,
            seq INTEGER NOT NULL,
            route TEXT NOT NULL,
            claimed_at DOUBLE PRECISION NOT NULL,
            row_count INTEGER NOT NULL,
            written_at DOUBLE PRECISION,
            file TEXT,
            holder TEXT,
            lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
            PRIMARY KEY (delivery, seq)
        )""",
        """CREATE TABLE delivered (
            delivery TEXT NOT NULL,
            prediction_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            PRIMARY KEY (delivery, prediction_id)
        )""",
        "CREATE INDEX delivered_seq ON delivered (delivery, seq)",
    ),
)

LATEST_VERSION = len(MIGRATIONS)


class SchemaTooNewError(RuntimeError):
    def __init__(self, found: int) -> None:
        super().__init__(
            f"the database has schema version {found}, newer than this gateway's "
            f"{LATEST_VERSION}; upgrade model-gateway before pointing it at this database"
        )
