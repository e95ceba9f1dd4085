//! Durable store-and-forward queue.
