# cmake -DMOEKIT_PRESETS_OUTPUT=<file.cpp> -P embed_presets.cmake
#
# Writes the C++ source defining moekit::io::embedded_preset_texts(): every file of
# MOEKIT_PRESET_NAMES (presets.cmake) as a string literal of hex escapes, so that any byte
# (UTF-8 text, quotes, backslashes) survives unchanged.
include(${CMAKE_CURRENT_LIST_DIR}/presets.cmake)
if(NOT MOEKIT_PRESETS_OUTPUT)
  message(FATAL_ERROR "embed_presets.cmake: set MOEKIT_PRESETS_OUTPUT to the source to write")
endif()

set(code "// Generated from src/presets/*.json by src/presets/embed_presets.cmake: do not edit.\n")
string(APPEND code "#include \"io/presets.h\"\n\nnamespace moekit::io {\nnamespace {\n\n")
set(entries "")
set(index 0)
foreach(name IN LISTS MOEKIT_PRESET_NAMES)
  set(file ${MOEKIT_PRESET_DIR}/${name}.json)
  if(NOT EXISTS ${file})
    message(FATAL_ERROR "embed_presets.cmake: preset ${name} is listed in presets.cmake but ${file} does not exist")
  endif()
  file(READ ${file} hex HEX)
  string(LENGTH "${hex}" hex_length)
  string(APPEND code "// src/presets/${name}.json\nconstexpr char kText${index}[] =")
  # 32 bytes (64 hex digits) per line of the literal.
  set(offset 0)
  while(offset LESS hex_length)
    string(SUBSTRING "${hex}" ${offset} 64 chunk)
    string(REGEX REPLACE "([0-9a-f][0-9a-f])" "\\\\x\\1" chunk "${chunk}")
    string(APPEND code "\n    \"${chunk}\"")
    math(EXPR offset "${offset} + 64")
  endwhile()
  if(hex_length EQUAL 0)
    string(APPEND code " \"\"")
  endif()
  string(APPEND code ";\n\n")
  string(APPEND entries
         "      {\"${name}\", \"src/presets/${name}.json\", {kText${index}, sizeof(kText${index}) - 1}},\n")
  math(EXPR index "${index} + 1")
endforeach()

string(APPEND code "}  // namespace\n\nstd::span<const PresetText> embedded_preset_texts() {\n")
string(APPEND code "  static constexpr PresetText kTexts[] = {\n${entries}  };\n  return kTexts;\n}\n\n")
string(APPEND code "}  // namespace moekit::io\n")
file(WRITE ${MOEKIT_PRESETS_OUTPUT} "${code}")
