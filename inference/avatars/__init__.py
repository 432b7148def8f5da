"""Avatars: where they live on disk (``layout``), the loaded ones kept in memory (``cache``), their
preparations (``jobs``) and the facade the server uses (``store.AvatarStore``).

Import from the modules themselves: ``inference.engine`` uses ``layout``, and ``store`` uses
``inference.engine``, so this package re-exports nothing.
"""
