//! Telemetry: run reports and plots.
