"""IIIF: index the images museums publish (Presentation manifests and collections, v2 and v3, read through the
Image API) and answer as a IIIF Content Search 2.0 service. documents: reading manifests and collections; images:
info.json, the size to fetch, region URLs; fetch: HTTP with timeouts, retries and byte limits; harvest: listing a
source into canvases; links: the IIIF links of a hit; search_service: Content Search answers and manifests."""
