//! In-memory broker for the worker pipeline tests (filled in below).
