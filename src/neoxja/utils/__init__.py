"""Import paths that mirror `transformers.utils`, so that snippets written for transformers run with only the
package name changed."""
