"""The toy world, where the truth is known: its scenes and oracle (`world`), tiny random-weight models in the real
formats for offline tests (`random_models`), the trainer of its small models (`trainer`) and `lpo demo` (`demo`)."""
