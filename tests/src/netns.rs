//! Network namespaces for link tests.
