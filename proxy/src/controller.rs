//! Live configuration from the controller (being built).
