"""Initial schema: models, batches, drift, indices, predictions, decisions, retrains,
calibrations, energy probes, budgets and the budget ledger.

Frozen history: this file must not import shiftcost; types are spelled out here so a
later change to the ORM models cannot change what this revision creates.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# JSON on SQLite, JSONB on PostgreSQL.
JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('budgets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('scope', sa.String(length=200), nullable=False),
    sa.Column('period', sa.String(length=20), nullable=False),
    sa.Column('rolling_days', sa.Integer(), nullable=True),
    sa.Column('kwh_cap', sa.Float(), nullable=True),
    sa.Column('co2_cap', sa.Float(), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("(period = 'rolling_days' AND rolling_days >= 1) OR (period <> 'rolling_days' AND rolling_days IS NULL)", name=op.f('ck_budgets_rolling_days')),
    sa.CheckConstraint("period IN ('per_run', 'daily', 'monthly', 'rolling_days')", name=op.f('ck_budgets_period')),
    sa.CheckConstraint('co2_cap IS NULL OR co2_cap >= 0', name=op.f('ck_budgets_co2_cap_nonnegative')),
    sa.CheckConstraint('kwh_cap IS NOT NULL OR co2_cap IS NOT NULL', name=op.f('ck_budgets_some_cap')),
    sa.CheckConstraint('kwh_cap IS NULL OR kwh_cap >= 0', name=op.f('ck_budgets_kwh_cap_nonnegative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_budgets')),
    sa.UniqueConstraint('name', name=op.f('uq_budgets_name'))
    )
    op.create_table('energy_probes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('architecture', sa.String(length=200), nullable=False),
    sa.Column('hardware', sa.String(length=300), nullable=False),
    sa.Column('image_size', sa.String(length=50), nullable=False),
    sa.Column('batch_size', sa.Integer(), nullable=True),
    sa.Column('samples', sa.Integer(), nullable=True),
    sa.Column('epochs', sa.Float(), nullable=True),
    sa.Column('energy_kwh', sa.Float(), nullable=True),
    sa.Column('joules_per_sample_epoch', sa.Float(), nullable=False),
    sa.Column('measurement_method', sa.String(length=50), nullable=True),
    sa.Column('details', JSON_TYPE, nullable=True),
    sa.Column('measured_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('joules_per_sample_epoch >= 0', name=op.f('ck_energy_probes_joules_nonnegative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_energy_probes'))
    )
    op.create_index(op.f('ix_energy_probes_architecture_hardware_measured_at'), 'energy_probes', ['architecture', 'hardware', 'measured_at'], unique=False)

    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('architecture', sa.String(length=200), nullable=False),
    sa.Column('weights_uri', sa.Text(), nullable=True),
    sa.Column('layers', JSON_TYPE, nullable=False),
    sa.Column('classes', JSON_TYPE, nullable=True),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('fingerprint', sa.String(length=128), nullable=True),
    sa.Column('details', JSON_TYPE, nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['parent_id'], ['models.id'], name=op.f('fk_models_parent_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_models_name_version'))
    )
    op.create_index(op.f('ix_models_name'), 'models', ['name'], unique=False)

    op.create_table('batches',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('model_name', sa.String(length=200), nullable=False),
    sa.Column('source_uri', sa.Text(), nullable=False),
    sa.Column('fingerprint', sa.String(length=128), nullable=False),
    sa.Column('samples', sa.Integer(), nullable=False),
    sa.Column('has_labels', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('registered_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('registered', 'assessing', 'assessed', 'retraining', 'done', 'failed')", name=op.f('ck_batches_status')),
    sa.CheckConstraint('samples >= 0', name=op.f('ck_batches_samples_nonnegative')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_batches_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batches')),
    sa.UniqueConstraint('model_name', 'fingerprint', name=op.f('uq_batches_model_name_fingerprint'))
    )
    op.create_index(op.f('ix_batches_model_id_registered_at'), 'batches', ['model_id', 'registered_at'], unique=False)
    op.create_index(op.f('ix_batches_status'), 'batches', ['status'], unique=False)

    op.create_table('calibrations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('architecture', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=True),
    sa.Column('source', sa.String(length=10), nullable=False),
    sa.Column('n_points', sa.Integer(), nullable=False),
    sa.Column('fit_data', JSON_TYPE, nullable=False),
    sa.Column('parameters', JSON_TYPE, nullable=False),
    sa.Column('loo_error', sa.Float(), nullable=True),
    sa.Column('interval_level', sa.Float(), nullable=True),
    sa.Column('details', JSON_TYPE, nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("source IN ('sweep', 'refit')", name=op.f('ck_calibrations_source')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_calibrations_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_calibrations')),
    sa.UniqueConstraint('architecture', 'version', name=op.f('uq_calibrations_architecture_version'))
    )
    op.create_index(op.f('ix_calibrations_created_at'), 'calibrations', ['created_at'], unique=False)

    op.create_table('reference_stats',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('fingerprint', sa.String(length=128), nullable=False),
    sa.Column('samples', sa.Integer(), nullable=False),
    sa.Column('accuracy', sa.Float(), nullable=True),
    sa.Column('details', JSON_TYPE, nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_reference_stats_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reference_stats'))
    )
    op.create_index(op.f('ix_reference_stats_model_id_created_at'), 'reference_stats', ['model_id', 'created_at'], unique=False)

    op.create_table('drift_reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.Column('method', sa.String(length=100), nullable=False),
    sa.Column('feature_set', sa.String(length=100), nullable=False),
    sa.Column('drift_detected', sa.Boolean(), nullable=False),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('threshold', sa.Float(), nullable=True),
    sa.Column('thresholds', JSON_TYPE, nullable=True),
    sa.Column('details', JSON_TYPE, nullable=True),
    sa.Column('html_uri', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_drift_reports_batch_id_batches')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_drift_reports'))
    )
    op.create_index(op.f('ix_drift_reports_batch_id'), 'drift_reports', ['batch_id'], unique=False)

    op.create_table('index_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('reference_stats_id', sa.Integer(), nullable=True),
    sa.Column('resque_dist', sa.Float(), nullable=True),
    sa.Column('resque_dist_variant', sa.String(length=16), nullable=True),
    sa.Column('inv_ari', sa.Float(), nullable=True),
    sa.Column('layer_shift', sa.Float(), nullable=True),
    sa.Column('resque_task', sa.Float(), nullable=True),
    sa.Column('preindex_p', sa.Float(), nullable=True),
    sa.Column('accuracy', sa.Float(), nullable=True),
    sa.Column('mean_loss', sa.Float(), nullable=True),
    sa.Column('mean_entropy', sa.Float(), nullable=True),
    sa.Column('device', sa.String(length=50), nullable=True),
    sa.Column('samples', sa.Integer(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('details', JSON_TYPE, nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_index_runs_batch_id_batches')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_index_runs_model_id_models')),
    sa.ForeignKeyConstraint(['reference_stats_id'], ['reference_stats.id'], name=op.f('fk_index_runs_reference_stats_id_reference_stats')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_index_runs'))
    )
    op.create_index(op.f('ix_index_runs_batch_id'), 'index_runs', ['batch_id'], unique=False)
    op.create_index(op.f('ix_index_runs_model_id_created_at'), 'index_runs', ['model_id', 'created_at'], unique=False)

    op.create_table('cost_predictions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('index_run_id', sa.Integer(), nullable=False),
    sa.Column('calibration_id', sa.Integer(), nullable=True),
    sa.Column('epochs', sa.Float(), nullable=False),
    sa.Column('epochs_lower', sa.Float(), nullable=True),
    sa.Column('epochs_upper', sa.Float(), nullable=True),
    sa.Column('energy_kwh', sa.Float(), nullable=False),
    sa.Column('energy_kwh_lower', sa.Float(), nullable=True),
    sa.Column('energy_kwh_upper', sa.Float(), nullable=True),
    sa.Column('emissions_kg', sa.Float(), nullable=False),
    sa.Column('emissions_kg_lower', sa.Float(), nullable=True),
    sa.Column('emissions_kg_upper', sa.Float(), nullable=True),
    sa.Column('interval_level', sa.Float(), nullable=True),
    sa.Column('predicted_not_to_converge', sa.Boolean(), nullable=False),
    sa.Column('joules_per_sample_epoch', sa.Float(), nullable=True),
    sa.Column('carbon_intensity', sa.Float(), nullable=True),
    sa.Column('samples', sa.Integer(), nullable=True),
    sa.Column('details', JSON_TYPE, nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['calibration_id'], ['calibrations.id'], name=op.f('fk_cost_predictions_calibration_id_calibrations')),
    sa.ForeignKeyConstraint(['index_run_id'], ['index_runs.id'], name=op.f('fk_cost_predictions_index_run_id_index_runs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cost_predictions'))
    )
    op.create_index(op.f('ix_cost_predictions_index_run_id'), 'cost_predictions', ['index_run_id'], unique=False)

    op.create_table('decisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('cost_prediction_id', sa.Integer(), nullable=True),
    sa.Column('action', sa.String(length=10), nullable=False),
    sa.Column('reasons', JSON_TYPE, nullable=False),
    sa.Column('blocked_by_budget', sa.Boolean(), nullable=False),
    sa.Column('budget_state', JSON_TYPE, nullable=True),
    sa.Column('policy', JSON_TYPE, nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("action IN ('retrain', 'skip', 'defer')", name=op.f('ck_decisions_action')),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_decisions_batch_id_batches')),
    sa.ForeignKeyConstraint(['cost_prediction_id'], ['cost_predictions.id'], name=op.f('fk_decisions_cost_prediction_id_cost_predictions')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_decisions_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_decisions'))
    )
    op.create_index(op.f('ix_decisions_batch_id'), 'decisions', ['batch_id'], unique=False)
    op.create_index(op.f('ix_decisions_created_at'), 'decisions', ['created_at'], unique=False)
    op.create_index(op.f('ix_decisions_model_id_created_at'), 'decisions', ['model_id', 'created_at'], unique=False)

    op.create_table('budget_ledger',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('budget_id', sa.Integer(), nullable=False),
    sa.Column('decision_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=10), nullable=False),
    sa.Column('energy_kwh', sa.Float(), nullable=False),
    sa.Column('emissions_kg', sa.Float(), nullable=False),
    sa.Column('reservation_id', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("(kind = 'reserve' AND reservation_id IS NULL) OR (kind <> 'reserve' AND reservation_id IS NOT NULL)", name=op.f('ck_budget_ledger_reservation_link')),
    sa.CheckConstraint("kind IN ('reserve', 'settle', 'release')", name=op.f('ck_budget_ledger_kind')),
    sa.CheckConstraint('energy_kwh >= 0 AND emissions_kg >= 0', name=op.f('ck_budget_ledger_amounts_nonnegative')),
    sa.ForeignKeyConstraint(['budget_id'], ['budgets.id'], name=op.f('fk_budget_ledger_budget_id_budgets')),
    sa.ForeignKeyConstraint(['decision_id'], ['decisions.id'], name=op.f('fk_budget_ledger_decision_id_decisions')),
    sa.ForeignKeyConstraint(['reservation_id'], ['budget_ledger.id'], name=op.f('fk_budget_ledger_reservation_id_budget_ledger')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_budget_ledger')),
    sa.UniqueConstraint('reservation_id', name=op.f('uq_budget_ledger_reservation_id'))
    )
    op.create_index(op.f('ix_budget_ledger_budget_id_kind_created_at'), 'budget_ledger', ['budget_id', 'kind', 'created_at'], unique=False)
    op.create_index(op.f('ix_budget_ledger_decision_id'), 'budget_ledger', ['decision_id'], unique=False)

    op.create_table('retrain_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('decision_id', sa.Integer(), nullable=True),
    sa.Column('batch_id', sa.Integer(), nullable=True),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('new_model_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('samples', sa.Integer(), nullable=True),
    sa.Column('steps', sa.Integer(), nullable=True),
    sa.Column('epochs', sa.Float(), nullable=True),
    sa.Column('reached_cutoff', sa.Boolean(), nullable=True),
    sa.Column('initial_accuracy', sa.Float(), nullable=True),
    sa.Column('target_accuracy', sa.Float(), nullable=True),
    sa.Column('final_accuracy', sa.Float(), nullable=True),
    sa.Column('energy_kwh', sa.Float(), nullable=True),
    sa.Column('emissions_kg', sa.Float(), nullable=True),
    sa.Column('cpu_energy_kwh', sa.Float(), nullable=True),
    sa.Column('gpu_energy_kwh', sa.Float(), nullable=True),
    sa.Column('ram_energy_kwh', sa.Float(), nullable=True),
    sa.Column('cpu_power_w', sa.Float(), nullable=True),
    sa.Column('gpu_power_w', sa.Float(), nullable=True),
    sa.Column('ram_power_w', sa.Float(), nullable=True),
    sa.Column('cpu_model', sa.String(length=300), nullable=True),
    sa.Column('gpu_model', sa.String(length=300), nullable=True),
    sa.Column('country_iso_code', sa.String(length=3), nullable=True),
    sa.Column('country_name', sa.String(length=100), nullable=True),
    sa.Column('region', sa.String(length=100), nullable=True),
    sa.Column('carbon_intensity', sa.Float(), nullable=True),
    sa.Column('energy_method', sa.String(length=50), nullable=True),
    sa.Column('grad_norms', JSON_TYPE, nullable=True),
    sa.Column('param_change', sa.Float(), nullable=True),
    sa.Column('param_change_per_layer', JSON_TYPE, nullable=True),
    sa.Column('wall_seconds', sa.Float(), nullable=True),
    sa.Column('details', JSON_TYPE, nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('running', 'succeeded', 'failed', 'cap_reached')", name=op.f('ck_retrain_runs_status')),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_retrain_runs_batch_id_batches')),
    sa.ForeignKeyConstraint(['decision_id'], ['decisions.id'], name=op.f('fk_retrain_runs_decision_id_decisions')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_retrain_runs_model_id_models')),
    sa.ForeignKeyConstraint(['new_model_id'], ['models.id'], name=op.f('fk_retrain_runs_new_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_retrain_runs'))
    )
    op.create_index(op.f('ix_retrain_runs_decision_id'), 'retrain_runs', ['decision_id'], unique=False)
    op.create_index(op.f('ix_retrain_runs_model_id_started_at'), 'retrain_runs', ['model_id', 'started_at'], unique=False)
    op.create_index(op.f('ix_retrain_runs_started_at'), 'retrain_runs', ['started_at'], unique=False)



def downgrade() -> None:
    op.drop_index(op.f('ix_retrain_runs_started_at'), table_name='retrain_runs')
    op.drop_index(op.f('ix_retrain_runs_model_id_started_at'), table_name='retrain_runs')
    op.drop_index(op.f('ix_retrain_runs_decision_id'), table_name='retrain_runs')

    op.drop_table('retrain_runs')
    op.drop_index(op.f('ix_budget_ledger_decision_id'), table_name='budget_ledger')
    op.drop_index(op.f('ix_budget_ledger_budget_id_kind_created_at'), table_name='budget_ledger')

    op.drop_table('budget_ledger')
    op.drop_index(op.f('ix_decisions_model_id_created_at'), table_name='decisions')
    op.drop_index(op.f('ix_decisions_created_at'), table_name='decisions')
    op.drop_index(op.f('ix_decisions_batch_id'), table_name='decisions')

    op.drop_table('decisions')
    op.drop_index(op.f('ix_cost_predictions_index_run_id'), table_name='cost_predictions')

    op.drop_table('cost_predictions')
    op.drop_index(op.f('ix_index_runs_model_id_created_at'), table_name='index_runs')
    op.drop_index(op.f('ix_index_runs_batch_id'), table_name='index_runs')

    op.drop_table('index_runs')
    op.drop_index(op.f('ix_drift_reports_batch_id'), table_name='drift_reports')

    op.drop_table('drift_reports')
    op.drop_index(op.f('ix_reference_stats_model_id_created_at'), table_name='reference_stats')

    op.drop_table('reference_stats')
    op.drop_index(op.f('ix_calibrations_created_at'), table_name='calibrations')

    op.drop_table('calibrations')
    op.drop_index(op.f('ix_batches_status'), table_name='batches')
    op.drop_index(op.f('ix_batches_model_id_registered_at'), table_name='batches')

    op.drop_table('batches')
    op.drop_index(op.f('ix_models_name'), table_name='models')

    op.drop_table('models')
    op.drop_index(op.f('ix_energy_probes_architecture_hardware_measured_at'), table_name='energy_probes')

    op.drop_table('energy_probes')
    op.drop_table('budgets')
