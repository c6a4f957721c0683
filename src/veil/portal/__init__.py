"""``veil portal``: the sign-up and API-key web pages of a managed veil service.

A client of ``veil serve`` like any other (evidence verified against its policy) holding an admin
key: `veil.portal.app.build_portal` serves the pages, `veil.portal.store.PortalStore` keeps
accounts, sessions and key ids (never a key secret). See docs/service.md.
"""
