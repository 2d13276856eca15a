//! SQLite task hub (being written).
