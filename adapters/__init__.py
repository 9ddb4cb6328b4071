"""Adapters exposing selproj reducers to TRAK and Captum (imported as ``selproj_plugin.adapters``)."""
