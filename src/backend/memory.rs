//! In-memory result backend for the worker pipeline tests (filled in below).
