"""The state database: model, store, views, writer, schema."""
