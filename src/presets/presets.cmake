# The presets, in documentation order (preset_names(), docs/config.md): one JSON file each in
# this directory (src/io/presets.h says what a file holds). Adding a preset: its file here and
# its name in this list.
set(MOEKIT_PRESET_NAMES
    hf-switch hf-mixtral hf-qwen2-moe hf-qwen3-moe hf-olmoe hf-deepseek-v3 hf-gpt-oss megatron
    deepspeed-top1 deepspeed-top2 deepspeed-topk flaxformer-tokens-choose flaxformer-experts-choose
    vmoe vmoe-experts-choose tutel megablocks)
set(MOEKIT_PRESET_DIR ${CMAKE_CURRENT_LIST_DIR})

# Adds to `target` a source holding the preset files' texts (io::embedded_preset_texts()),
# generated at build time by embed_presets.cmake with CMake alone, and regenerated when a
# file or the list changes.
function(moekit_embed_presets target)
  set(output ${CMAKE_CURRENT_BINARY_DIR}/${target}_presets.cpp)
  set(files)
  foreach(name IN LISTS MOEKIT_PRESET_NAMES)
    list(APPEND files ${MOEKIT_PRESET_DIR}/${name}.json)
  endforeach()
  add_custom_command(
    OUTPUT ${output}
    COMMAND ${CMAKE_COMMAND} -DMOEKIT_PRESETS_OUTPUT=${output} -P ${MOEKIT_PRESET_DIR}/embed_presets.cmake
    DEPENDS ${files} ${MOEKIT_PRESET_DIR}/embed_presets.cmake ${MOEKIT_PRESET_DIR}/presets.cmake
    COMMENT "Embedding the presets (src/presets/*.json)"
    VERBATIM)
  target_sources(${target} PRIVATE ${output})
endfunction()
