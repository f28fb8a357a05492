"""Operations: configuration, logging, command line and service integration."""
