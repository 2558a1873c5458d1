"""Models the chapters train with gradkit's estimators."""
