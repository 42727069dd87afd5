"""Queries every store runs, written once with ``%s`` placeholders; each store puts in its own
parameter style (SQLite ``?``, PostgreSQL ``$n``)."""

from __future__ import annotations

# Waiting labels whose prediction is stored: by prediction id, or by the client's request id
# (the latest live prediction with that id; its shadow copies carry the same request id).
PENDING_JOINS = """
SELECT f.feedback_id, f.label, f.inclusion_probability, f.outcome, p.prediction_id,
       p.route, p.variant,
       COALESCE(p.reported_version, p.configured_version) AS model_version,
       p.predicted, p.score
FROM feedback f
JOIN predictions p ON p.prediction_id = COALESCE(
    f.prediction_id,
    (SELECT q.prediction_id FROM predictions q WHERE q.request_id = f.request_id
     AND q.shadow = 0 ORDER BY q.request_time DESC LIMIT 1))
WHERE f.joined_at IS NULL
ORDER BY f.received_at
"""

# A prediction's latest feedback of one kind, by the prediction it was joined to: {columns}
# of the latest row that {condition}.
_LATEST = """(
    SELECT joined_prediction_id, {columns},
           ROW_NUMBER() OVER (PARTITION BY joined_prediction_id
                              ORDER BY label_time DESC, received_at DESC) AS feedback_rank
    FROM feedback WHERE joined_prediction_id IS NOT NULL AND {condition}
)"""
#: the label of the stream the figures count (not a hand label of a weighted sample)
_LABEL = _LATEST.format(
    columns="label", condition="label IS NOT NULL AND inclusion_probability IS NULL"
)
#: a hand label of a weighted sample, with its inclusion probability
_HAND_LABEL = _LATEST.format(
    columns="label AS hand_label, inclusion_probability",
    condition="label IS NOT NULL AND inclusion_probability IS NOT NULL",
)
#: a person's decision on the recommendation, and the value they recorded (each the latest
#: of its own: a later item with a value alone keeps the outcome)
_OUTCOME = _LATEST.format(columns="outcome", condition="outcome IS NOT NULL")
_VALUE = _LATEST.format(columns="value", condition="value IS NOT NULL")

# One row per prediction of a route in [since, until), with its latest label, hand label
# and decision. A shadow's row has those of the live prediction it copies, and that
# prediction's answer.
_ROWS = (
    """
SELECT p.variant, p.status, p.latency_ms, p.predicted, p.score,
       COALESCE(p.reported_version, p.configured_version) AS model_version,
       l.label, p.shadow, live.predicted AS live_predicted, live.score AS live_score,
       live.variant AS live_variant, p.request_time,
       p.config_version, p.assignment,
       p.inference, p.batch_of, p.batch_size, h.hand_label, h.inclusion_probability,
       d.outcome, v.value, COALESCE(p.features, live.features) AS features
FROM predictions p
LEFT JOIN predictions live ON live.prediction_id = p.shadow_of
LEFT JOIN """
    + _LABEL
    + """ l ON l.joined_prediction_id = COALESCE(p.shadow_of, p.prediction_id)
    AND l.feedback_rank = 1
LEFT JOIN """
    + _HAND_LABEL
    + """ h ON h.joined_prediction_id = COALESCE(p.shadow_of, p.prediction_id)
    AND h.feedback_rank = 1
LEFT JOIN """
    + _OUTCOME
    + """ d ON d.joined_prediction_id = COALESCE(p.shadow_of, p.prediction_id)
    AND d.feedback_rank = 1
LEFT JOIN """
    + _VALUE
    + """ v ON v.joined_prediction_id = COALESCE(p.shadow_of, p.prediction_id)
    AND v.feedback_rank = 1
WHERE p.route = %s AND p.request_time >= %s AND p.request_time < %s
"""
)
REPORT_ROWS = _ROWS + "ORDER BY p.request_time\n"
# A rollout's looks: the latest rows of its step (the operational and label-free gates, at a
# cost that does not grow with the step), and the labelled ones of the whole rollout (the
# quality gate's sequential test, which needs them all).
LATEST_ROWS = _ROWS + "ORDER BY p.request_time DESC LIMIT %s\n"
LABELLED_ROWS = _ROWS + "AND l.label IS NOT NULL ORDER BY p.request_time\n"

# Predictions of a route in [since, until) with their latest label of any origin, for export
# and sampling.
EXPORT_SELECT = (
    """
SELECT p.prediction_id, p.request_id, p.route, p.variant, p.model_name,
       p.configured_version, p.reported_version, p.config_version, p.assignment, p.inference,
       p.method, p.path, p.request_time, p.latency_ms, p.first_byte_ms, p.streamed, p.status,
       p.error, p.predicted, p.score, p.served_model, p.prompt_tokens, p.completion_tokens,
       p.shadow, p.shadow_of, p.batch_of, p.batch_size, p.features, p.request_truncated,
       l.label, l.label_time, l.origin AS label_origin
FROM predictions p
LEFT JOIN """
    + _LATEST.format(columns="label, label_time, origin", condition="label IS NOT NULL")
    + """ l ON l.joined_prediction_id = COALESCE(p.shadow_of, p.prediction_id)
    AND l.feedback_rank = 1
"""
)
EXPORT_ROWS = (
    EXPORT_SELECT
    + """WHERE p.route = %s AND p.request_time >= %s AND p.request_time < %s
ORDER BY p.prediction_id
"""
)
COUNT_ROWS = """
SELECT COUNT(*) FROM predictions
WHERE route = %s AND request_time >= %s AND request_time < %s
"""

# The shadow copies of the predictions whose labels one join pass joined (at ``now``), in one
# query rather than one per label.
SHADOWS_OF_JOINED = """
SELECT DISTINCT s.prediction_id, s.shadow_of, s.variant,
       COALESCE(s.reported_version, s.configured_version) AS model_version, s.predicted
FROM feedback f JOIN predictions s ON s.shadow_of = f.joined_prediction_id
WHERE f.joined_at = %s
"""

# The live predictions made for one client request id, latest first (UUIDv7 ids sort by time).
PREDICTIONS_OF_REQUEST = """
SELECT prediction_id FROM predictions WHERE request_id = %s AND shadow_of IS NULL
ORDER BY prediction_id DESC LIMIT %s
"""

# The shadow copies of one live prediction, for the audit view of that prediction.
SHADOWS_OF = """
SELECT prediction_id, variant, COALESCE(reported_version, configured_version) AS model_version,
       status, error, predicted, score, latency_ms
FROM predictions WHERE shadow_of = %s ORDER BY variant, prediction_id
"""

# A rollout's state and lease (rollout_runner.py). The lease is taken when nobody holds it,
# the taker already does, or the last one ran out; a decision is saved only while its
# gateway holds the lease and the state it judged is still the stored one (an operator's
# action in between stands).
ROLLOUTS = """
SELECT id, route, status, step, started_at, step_started_at, updated_at, reason, holder,
       lease_until
FROM rollouts ORDER BY id
"""
ROLLOUT_BY_ID = """
SELECT id, route, status, step, started_at, step_started_at, updated_at, reason
FROM rollouts WHERE id = %s
"""
BEGIN_ROLLOUT = """
INSERT INTO rollouts (id, route, status, step, started_at, step_started_at, updated_at, reason)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO NOTHING
"""
SAVE_ROLLOUT = """
UPDATE rollouts SET status = %s, step = %s, step_started_at = %s, updated_at = %s, reason = %s
WHERE id = %s
"""
SAVE_HELD_ROLLOUT = """
UPDATE rollouts SET status = %s, step = %s, step_started_at = %s, updated_at = %s, reason = %s
WHERE id = %s AND holder = %s AND updated_at = %s
"""
LEASE_ROLLOUT = """
UPDATE rollouts SET holder = %s, lease_until = %s
WHERE id = %s AND (holder IS NULL OR holder = %s OR lease_until < %s)
"""
#: the order of a state's values in BEGIN_ROLLOUT, and of the first five in SAVE_ROLLOUT
ROLLOUT_SAVED = ("status", "step", "step_started_at", "updated_at", "reason")

# A window's monitored records (monitoring.py): a request's features are on its own record,
# a prediction's score on its own. A window of more records than a look reads is read as a
# sample: the records whose prediction id ends (its last six hex digits, random in a UUIDv7;
# a batch's rows share their request's) below a bound, so that a request is in or out alike
# in every window and on every gateway. {collate}: the byte order of the digits.
_MONITORED = """
FROM predictions
WHERE route = %s AND request_time >= %s AND request_time < %s AND inference = 1 AND shadow = 0
"""
MONITORED_COUNT = "SELECT COUNT(*) " + _MONITORED
MONITORED_ROWS = (
    """SELECT variant, COALESCE(reported_version, configured_version) AS model_version, status,
       score, features, batch_size """
    + _MONITORED
    + "AND substr(prediction_id, 31, 6){collate} < %s"
)
#: the bound that takes every record
EVERY_RECORD = "g"
#: the references of a route (every route's: NULL), newest first
REFERENCES = """
SELECT reference_id, route, variant, model_version, created_at, source, body
FROM drift_references WHERE CAST(%s AS TEXT) IS NULL OR route = %s
ORDER BY created_at DESC, reference_id
"""
SAVE_REFERENCE = """
INSERT INTO drift_references (reference_id, route, variant, model_version, created_at, source, body)
VALUES (%s, %s, %s, %s, %s, %s, %s)
"""
REFERENCE_COLUMNS = (
    "reference_id", "route", "variant", "model_version", "created_at", "source", "body"
)  # fmt: skip
DELETE_REFERENCE = "DELETE FROM drift_references WHERE reference_id = %s"

# Deliveries (deliveries.py): a run reads which live predictions of its route since a time
# no run of the same delivery has claimed (a read: the log writes on meanwhile), then claims
# them, in one short transaction, under the delivery's next number (a prediction claimed by
# another run meanwhile is skipped); its file is written from the claim, and the run marked
# written after the rename.
NEXT_DELIVERY = "SELECT COALESCE(MAX(seq), 0) + 1 FROM deliveries WHERE delivery = %s"
UNCLAIMED = """
SELECT p.prediction_id FROM predictions p
WHERE p.route = %s AND p.request_time >= %s AND p.shadow = 0 AND p.inference = 1
  AND p.batch_size IS NULL
  AND NOT EXISTS (
    SELECT 1 FROM delivered d WHERE d.delivery = %s AND d.prediction_id = p.prediction_id
  )
"""
#: SQLite's, row by row; PostgreSQL inserts the ids as one array
CLAIM = """
INSERT INTO delivered (delivery, prediction_id, seq) VALUES (%s, %s, %s)
ON CONFLICT (delivery, prediction_id) DO NOTHING
"""
SAVE_DELIVERY = """
INSERT INTO deliveries (delivery, seq, route, claimed_at, row_count, holder, lease_until)
VALUES (%s, %s, %s, %s, %s, %s, %s)
"""
#: the runs a look needs: the last one, and any not written yet
DELIVERY_RUNS = """
SELECT delivery, seq, route, claimed_at, row_count, written_at, file
FROM deliveries WHERE delivery = %s
  AND (written_at IS NULL OR seq = (SELECT MAX(seq) FROM deliveries WHERE delivery = %s))
ORDER BY seq
"""
#: a run's writing is taken over only from a process whose lease ran out
LEASE_DELIVERY = """
UPDATE deliveries SET holder = %s, lease_until = %s
WHERE delivery = %s AND seq = %s AND written_at IS NULL
  AND (holder IS NULL OR holder = %s OR lease_until < %s)
"""
MARK_DELIVERED = "UPDATE deliveries SET written_at = %s, file = %s WHERE delivery = %s AND seq = %s"
DELIVERY_ROWS = (
    EXPORT_SELECT.replace("l.origin AS label_origin", "l.origin AS label_origin, p.request_body")
    + """JOIN delivered d ON d.prediction_id = p.prediction_id
WHERE d.delivery = %s AND d.seq = %s AND d.prediction_id > %s
ORDER BY d.prediction_id LIMIT %s
"""
)
