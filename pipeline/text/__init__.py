"""Text in and text out, no models: language detection, sentence layout, where an answer ends, rendering."""
