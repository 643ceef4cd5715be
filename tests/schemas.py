"""The ten JSON schemas of the structured-output tests and bench: nested objects, arrays with item bounds, enums,
integers, booleans, anyOf, required and optional fields, bounded strings. Each is bounded (lengths, item counts,
ranges, no extra keys), so a valid answer always ends well within 160 tokens."""

WORD = {"type": "string", "minLength": 1, "maxLength": 6}
SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": WORD, "age": {"type": "integer", "minimum": 0,
                                                                     "maximum": 120}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "first": WORD, "last": WORD}, "required": ["first", "last"], "additionalProperties": False},
        "ok": {"type": "boolean"}}, "required": ["person", "ok"], "additionalProperties": False},
    "array bounds": {"type": "object", "properties": {"tags": {"type": "array", "items": WORD, "minItems": 2,
                                                                "maxItems": 3}},
                     "required": ["tags"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"type": "string", "enum": ["S", "M", "L"]}},
             "required": ["color", "size"], "additionalProperties": False},
    "integers": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                                  "y": {"type": "integer", "minimum": 10, "maximum": 99}},
                 "required": ["x", "y"], "additionalProperties": False},
    "booleans": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    "anyOf": {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                               {"type": "boolean"}, WORD]}},
              "required": ["v"], "additionalProperties": False},
    "optional fields": {"type": "object", "properties": {"a": WORD, "b": {"type": "boolean"},
                                                         "c": {"type": "integer", "minimum": 0, "maximum": 3}},
                        "required": ["a"], "additionalProperties": False},
    "bounded strings": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                                         "note": {"type": "string", "maxLength": 3}},
                        "required": ["code", "note"], "additionalProperties": False},
    "array of objects": {"type": "array", "items": {"type": "object", "properties": {"id": {
        "type": "integer", "minimum": 1, "maximum": 9}, "on": {"type": "boolean"}}, "required": ["id", "on"],
        "additionalProperties": False}, "minItems": 1, "maxItems": 2},
}
