"""AdvertiseX ad-event lakehouse: streaming ingestion, attribution and campaign metrics on Delta Lake."""
